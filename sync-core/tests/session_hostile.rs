//! A hostile or broken peer: frames out of order, not asked for, corrupt,
//! oversized or random. Every case must end in a typed error, an `Error`
//! frame for the peer and a `Failed` event, never a panic.

use std::time::Instant;

use sync_core::chunk::chunk_content;
use sync_core::manifest::{Entry, Kind, Manifest, Tree};
use sync_core::session::{
    Channel, SessionError, SinkEvent, SinkOptions, SinkSession, SourceEvent, SourceOptions,
    SourceSession,
};
use sync_core::wire::{
    decode, encode, Direction, ErrorCode, Frame, FrameDecoder, FrameType, WireError, HEADER_LEN,
    MAX_FRAME, MAX_IDS_PER_MESSAGE, PROTOCOL_VERSION,
};
use sync_core::{ChunkId, SnapshotId, TreeId};

fn file(name: &[u8], content: &[u8]) -> Entry {
    let c = chunk_content(content);
    Entry {
        name: name.to_vec(),
        mode: 0o644,
        mtime_ns: 0,
        uid: 0,
        gid: 0,
        kind: Kind::File {
            size: c.size,
            hash: c.hash,
            chunks: c.chunks,
        },
    }
}

fn manifest() -> Manifest {
    let mut m = Manifest::empty();
    m.set_entry(b"a", Some(file(b"a", b"alpha"))).unwrap();
    m.set_entry(b"b", Some(file(b"b", &vec![7; 300_000])))
        .unwrap();
    m
}

fn hello() -> Frame {
    Frame::Hello {
        version: PROTOCOL_VERSION,
        tree: "t".into(),
        direction: Direction::Push,
        client_agent: "evil".into(),
    }
}

/// A push-server sink that has seen the offer of `m` and asked for its root.
fn sink_fetching(m: &Manifest) -> SinkSession {
    let now = Instant::now();
    let mut s = SinkSession::server(None, SinkOptions::default(), now);
    s.handle_frame(Frame::Offer { root: m.snapshot() }, now)
        .unwrap();
    while s.poll_transmit().is_some() {}
    s
}

/// A sink in the chunk phase: trees received, every chunk missing.
fn sink_transferring(m: &Manifest) -> SinkSession {
    let mut s = sink_fetching(m);
    let raw = m.raw(&m.root()).unwrap().to_vec();
    s.handle_frame(
        Frame::Trees {
            trees: vec![(m.root(), raw)],
        },
        Instant::now(),
    )
    .unwrap();
    let Some(SinkEvent::NeedChunkCheck(need)) = s.poll_event() else {
        panic!("no chunk check")
    };
    s.chunks_missing(need.into_iter().map(|c| c.0).collect())
        .unwrap();
    while s.poll_transmit().is_some() {}
    s
}

/// The session failed with `code`: it queued an Error frame and a Failed event.
fn assert_failed_sink(s: &mut SinkSession, code: ErrorCode) {
    assert!(s.is_failed());
    match s.poll_transmit() {
        Some((Channel::Control, Frame::Error { code: c, .. })) => assert_eq!(c, code),
        other => panic!("no error frame: {other:?}"),
    }
    assert!(s.poll_transmit().is_none(), "nothing after the error");
    let mut failed = false;
    while let Some(ev) = s.poll_event() {
        if let SinkEvent::Failed(c, _) = ev {
            assert_eq!(c, code);
            failed = true;
        }
    }
    assert!(failed);
}

fn assert_failed_source(s: &mut SourceSession, code: ErrorCode) {
    assert!(s.is_failed());
    match s.poll_transmit() {
        Some((Channel::Control, Frame::Error { code: c, .. })) => assert_eq!(c, code),
        other => panic!("frames queued before a failure must be dropped: {other:?}"),
    }
    assert!(s.poll_transmit().is_none());
    assert!(matches!(s.poll_event(), Some(SourceEvent::Failed(c, _)) if c == code));
}

#[test]
fn out_of_order_frames_to_the_sink_are_protocol_errors() {
    let m = manifest();
    let now = Instant::now();
    let id = ChunkId::of(b"alpha");
    let cases = vec![
        Frame::Chunks {
            chunks: vec![(id, b"alpha".to_vec())],
        },
        hello(),
        Frame::Trees { trees: vec![] },
        Frame::WantTrees {
            ids: vec![m.root()],
        },
        Frame::WantChunks { ids: vec![id] },
        Frame::Done { root: m.snapshot() },
        Frame::Committed { root: m.snapshot() },
        Frame::Welcome {
            version: 1,
            sink_root: None,
        },
        Frame::SinkState { root: None },
    ];
    for f in cases {
        let name = f.name();
        let mut s = SinkSession::server(None, SinkOptions::default(), now);
        s.poll_transmit();
        let err = s.handle_frame(f, now).unwrap_err();
        assert!(
            matches!(err, SessionError::Unexpected { .. }),
            "{name}: {err}"
        );
        assert_failed_sink(&mut s, ErrorCode::Protocol);
        // Input after the failure is ignored.
        s.handle_frame(hello(), now).unwrap();
        assert!(s.poll_transmit().is_none());
    }
    // A second offer, and Done before the last want, are out of order too.
    let mut s = sink_fetching(&m);
    let err = s
        .handle_frame(Frame::Offer { root: m.snapshot() }, now)
        .unwrap_err();
    assert!(matches!(err, SessionError::Unexpected { .. }));
    let mut s = sink_fetching(&m);
    assert!(s
        .handle_frame(Frame::Done { root: m.snapshot() }, now)
        .is_err());
}

#[test]
fn trees_and_chunks_not_asked_for_are_refused() {
    let m = manifest();
    let now = Instant::now();
    let mut s = sink_fetching(&m);
    let other = Tree::default();
    let err = s
        .handle_frame(
            Frame::Trees {
                trees: vec![(other.id(), other.encode())],
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        SessionError::NotRequested { what: "tree", .. }
    ));
    assert_failed_sink(&mut s, ErrorCode::Protocol);

    // The same tree twice in one frame: the second was not asked for.
    let mut s = sink_fetching(&m);
    let raw = m.raw(&m.root()).unwrap().to_vec();
    assert!(s
        .handle_frame(
            Frame::Trees {
                trees: vec![(m.root(), raw.clone()), (m.root(), raw)],
            },
            now,
        )
        .is_err());

    let mut s = sink_transferring(&m);
    let stranger = b"not in the manifest".to_vec();
    let err = s
        .handle_frame(
            Frame::Chunks {
                chunks: vec![(ChunkId::of(&stranger), stranger)],
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        SessionError::NotRequested { what: "chunk", .. }
    ));
    assert_failed_sink(&mut s, ErrorCode::Protocol);

    // A chunk sent twice is refused even before it is staged.
    let mut s = sink_transferring(&m);
    let alpha = (ChunkId::of(b"alpha"), b"alpha".to_vec());
    s.handle_frame(
        Frame::Chunks {
            chunks: vec![alpha.clone()],
        },
        now,
    )
    .unwrap();
    let err = s
        .handle_frame(
            Frame::Chunks {
                chunks: vec![alpha],
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, SessionError::Duplicate { .. }));
}

#[test]
fn corrupt_chunks_and_trees_are_bad_data() {
    let m = manifest();
    let now = Instant::now();
    // A chunk whose bytes do not hash to its id.
    let mut s = sink_transferring(&m);
    let err = s
        .handle_frame(
            Frame::Chunks {
                chunks: vec![(ChunkId::of(b"alpha"), b"alphA".to_vec())],
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, SessionError::BadChunk { .. }));
    assert_failed_sink(&mut s, ErrorCode::BadData);
    assert!(
        !std::iter::from_fn(|| s.poll_event()).any(|e| matches!(e, SinkEvent::StoreChunks(_))),
        "nothing unverified reaches the driver"
    );

    // A tree object whose bytes do not match the id asked for.
    let mut s = sink_fetching(&m);
    let mut raw = m.raw(&m.root()).unwrap().to_vec();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    let err = s
        .handle_frame(
            Frame::Trees {
                trees: vec![(m.root(), raw)],
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, SessionError::BadTree { .. }));
    assert_failed_sink(&mut s, ErrorCode::BadData);
}

/// A source offering a root whose tree holds `..` (its id matches its
/// bytes, so only the decoder's validation stands in the way).
#[test]
fn a_tree_with_a_dotdot_name_is_refused() {
    for bad in [&b".."[..], b".", b"a/b", b"x\0y", b""] {
        let tree = Tree {
            entries: vec![Entry {
                kind: Kind::Symlink {
                    target: b"/etc".to_vec(),
                },
                ..file(bad, b"")
            }],
        };
        let bytes = tree.encode();
        let id = TreeId::of(&bytes);
        let now = Instant::now();
        let mut s = SinkSession::server(None, SinkOptions::default(), now);
        s.handle_frame(Frame::Offer { root: id.into() }, now)
            .unwrap();
        while s.poll_transmit().is_some() {}
        let err = s
            .handle_frame(
                Frame::Trees {
                    trees: vec![(id, bytes)],
                },
                now,
            )
            .unwrap_err();
        assert!(
            matches!(err, SessionError::BadTree { .. }),
            "{bad:?}: {err}"
        );
        assert_failed_sink(&mut s, ErrorCode::BadData);
    }
}

#[test]
fn a_hostile_sink_gets_typed_errors_from_the_source() {
    let m = manifest();
    let now = Instant::now();
    let welcome = Frame::Welcome {
        version: PROTOCOL_VERSION,
        sink_root: None,
    };
    let fresh = || {
        let mut s =
            SourceSession::client("t", "x", m.clone(), SourceOptions::default(), now).unwrap();
        while s.poll_transmit().is_some() {}
        s
    };
    // Before Welcome, anything else is out of order.
    for f in [
        Frame::WantTrees {
            ids: vec![m.root()],
        },
        Frame::Committed { root: m.snapshot() },
        Frame::Trees { trees: vec![] },
    ] {
        let mut s = fresh();
        assert!(matches!(
            s.handle_frame(f, now),
            Err(SessionError::Unexpected { .. })
        ));
        assert_failed_source(&mut s, ErrorCode::Protocol);
    }
    // Wrong version in Welcome.
    let mut s = fresh();
    let err = s
        .handle_frame(
            Frame::Welcome {
                version: 9,
                sink_root: None,
            },
            now,
        )
        .unwrap_err();
    assert!(matches!(err, SessionError::Version { theirs: 9, .. }));
    // Unknown tree, committed root that was not offered, second welcome.
    let cases: Vec<(Frame, ErrorCode)> = vec![
        (
            Frame::WantTrees {
                ids: vec![TreeId([1; 32])],
            },
            ErrorCode::UnknownTree,
        ),
        (
            Frame::Committed {
                root: SnapshotId([1; 32]),
            },
            ErrorCode::Protocol,
        ),
        (welcome.clone(), ErrorCode::Protocol),
        (
            Frame::Chunks {
                chunks: vec![(ChunkId::of(b"x"), b"x".to_vec())],
            },
            ErrorCode::Protocol,
        ),
    ];
    for (f, code) in cases {
        let mut s = fresh();
        s.handle_frame(welcome.clone(), now).unwrap();
        let err = s.handle_frame(f, now).unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert_failed_source(&mut s, code);
    }
    // More chunks outstanding than the source allows.
    let mut s = SourceSession::client(
        "t",
        "x",
        m.clone(),
        SourceOptions {
            max_pending_chunks: 10,
            ..SourceOptions::default()
        },
        now,
    )
    .unwrap();
    while s.poll_transmit().is_some() {}
    s.handle_frame(welcome.clone(), now).unwrap();
    let ids = (0..11u8).map(|i| ChunkId([i; 32])).collect();
    let err = s.handle_frame(Frame::WantChunks { ids }, now).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge);
    // The driver handing in a chunk that was not asked for is refused.
    let mut s = fresh();
    s.handle_frame(welcome, now).unwrap();
    let err = s
        .send_chunks(vec![(ChunkId::of(b"alpha"), b"alpha".to_vec())])
        .unwrap_err();
    assert!(matches!(err, SessionError::Driver(_)));
}

#[test]
fn a_peer_error_ends_the_session_without_an_echo() {
    let now = Instant::now();
    let mut s = SinkSession::server(None, SinkOptions::default(), now);
    s.poll_transmit();
    let err = s
        .handle_frame(Frame::error(ErrorCode::Busy, "another sync runs"), now)
        .unwrap_err();
    assert!(matches!(
        err,
        SessionError::Peer {
            code: ErrorCode::Busy,
            ..
        }
    ));
    assert!(
        s.poll_transmit().is_none(),
        "no error frame back to the peer"
    );
    assert!(matches!(
        s.poll_event(),
        Some(SinkEvent::Failed(ErrorCode::Busy, _))
    ));
}

#[test]
fn oversized_and_malformed_bytes_give_wire_errors() {
    // Length beyond the limit: refused on the header, before any payload.
    let mut d = FrameDecoder::new();
    let mut hdr = u32::MAX.to_le_bytes().to_vec();
    hdr.push(FrameType::Chunks as u8);
    assert!(matches!(
        d.push(&hdr),
        Err(WireError::TooLarge { len, max: MAX_FRAME }) if len == u32::MAX as usize
    ));
    assert!(d.push(&[0; 100]).is_err());
    // Unknown type.
    let mut d = FrameDecoder::new();
    assert_eq!(d.push(&[1, 0, 0, 0, 200]), Err(WireError::UnknownType(200)));
    // A payload that does not decode as its type.
    let mut bad = vec![3, 0, 0, 0, FrameType::Offer as u8];
    bad.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(decode(&bad), Err(WireError::BadPayload { .. })));
    // Too many ids in one message.
    let f = Frame::WantTrees {
        ids: vec![TreeId([0; 32]); MAX_IDS_PER_MESSAGE + 1],
    };
    assert!(matches!(decode(&encode(&f)), Err(WireError::Limit { .. })));
    // A Hello with a bad direction tag.
    let mut enc = encode(&hello());
    let dir_at = HEADER_LEN + 1 + 1 + 1; // version varint, len, "t"
    assert_eq!(enc[dir_at], 0, "Push is variant 0");
    enc[dir_at] = 7;
    assert!(decode(&enc).is_err());
}

/// Random frames in random order against sinks and sources at several
/// points of a real exchange: typed errors only, never a panic.
#[test]
fn random_frame_sequences_never_panic() {
    let m = manifest();
    let id = |r: u64| ChunkId::of(&r.to_le_bytes());
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let alpha = ChunkId::of(b"alpha");
    for round in 0..3000 {
        let mut frames = Vec::new();
        for _ in 0..(next() % 6 + 1) {
            let r = next();
            frames.push(match r % 12 {
                0 => hello(),
                1 => Frame::Welcome {
                    version: (r >> 8) as u16 % 3,
                    sink_root: None,
                },
                2 => Frame::Offer {
                    root: if r & 256 == 0 {
                        m.snapshot()
                    } else {
                        SnapshotId([r as u8; 32])
                    },
                },
                3 => Frame::WantTrees {
                    ids: vec![if r & 256 == 0 {
                        m.root()
                    } else {
                        TreeId([1; 32])
                    }],
                },
                4 => Frame::Trees {
                    trees: vec![(m.root(), m.raw(&m.root()).unwrap().to_vec())],
                },
                5 => Frame::WantChunks {
                    ids: if r & 256 == 0 {
                        vec![]
                    } else {
                        vec![alpha, id(r)]
                    },
                },
                6 => Frame::Chunks {
                    chunks: vec![(alpha, b"alpha".to_vec())],
                },
                7 => Frame::Chunks {
                    chunks: vec![(id(r), vec![1; 10])],
                },
                8 => Frame::Done { root: m.snapshot() },
                9 => Frame::Committed { root: m.snapshot() },
                10 => Frame::SinkState { root: None },
                _ => Frame::error(ErrorCode::from_u16(r as u16 % 10), "x"),
            });
        }
        let now = Instant::now();
        // Through the codec, as a peer would send them.
        let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
        let mut d = FrameDecoder::new();
        d.push(&bytes).unwrap();
        let mut sink = match round % 3 {
            0 => SinkSession::server(None, SinkOptions::default(), now),
            1 => SinkSession::client("t", "x", None, SinkOptions::default(), now).unwrap(),
            _ => sink_fetching(&m),
        };
        let mut source = if round % 2 == 0 {
            SourceSession::client("t", "x", m.clone(), SourceOptions::default(), now).unwrap()
        } else {
            SourceSession::server(m.clone(), SourceOptions::default(), now)
        };
        while let Some(f) = d.next_frame().unwrap() {
            let a = sink.handle_frame(f.clone(), now);
            let b = source.handle_frame(f, now);
            if a.is_err() {
                assert!(sink.is_failed());
            }
            if b.is_err() {
                assert!(source.is_failed());
            }
            // Drive the completions the way a driver would.
            while let Some(ev) = sink.poll_event() {
                match ev {
                    SinkEvent::NeedChunkCheck(l) => {
                        let _ = sink.chunks_missing(l.into_iter().map(|c| c.0).collect());
                    }
                    SinkEvent::StoreChunks(c) => {
                        let _ = sink.chunks_stored(c.into_iter().map(|c| c.0).collect());
                    }
                    SinkEvent::Commit { manifest, .. } => {
                        let _ = sink.commit_done(Ok(manifest.snapshot()));
                    }
                    _ => {}
                }
            }
            while let Some(ev) = source.poll_event() {
                if let SourceEvent::ReadChunks(ids) = ev {
                    let chunks = ids
                        .into_iter()
                        .filter(|i| *i == alpha)
                        .map(|i| (i, b"alpha".to_vec()))
                        .collect();
                    let _ = source.send_chunks(chunks);
                }
            }
            while let Some((_, f)) = sink.poll_transmit() {
                assert!(f.validate().is_ok());
            }
            while let Some((_, f)) = source.poll_transmit() {
                assert!(f.validate().is_ok());
            }
        }
    }
}

/// A chain of directories nested past the limit is refused while it is
/// being fetched, one level per round trip, not after all of it arrived.
#[test]
fn a_tree_chain_deeper_than_the_limit_is_refused_during_fetch() {
    use std::collections::HashMap;
    let depth = sync_core::manifest::MAX_DEPTH + 5;
    let mut objects = HashMap::new();
    let mut below = Tree {
        entries: vec![file(b"f", b"leaf")],
    };
    for _ in 0..depth {
        let bytes = below.encode();
        let id = TreeId::of(&bytes);
        objects.insert(id, bytes);
        below = Tree {
            entries: vec![Entry {
                kind: Kind::Dir { tree: id },
                mode: 0o755,
                ..file(b"d", b"")
            }],
        };
    }
    let bytes = below.encode();
    let root = TreeId::of(&bytes);
    objects.insert(root, bytes);
    let now = Instant::now();
    let mut s = SinkSession::server(None, SinkOptions::default(), now);
    s.handle_frame(Frame::Offer { root: root.into() }, now)
        .unwrap();
    let mut served = 0;
    let err = loop {
        let mut asked = Vec::new();
        while let Some((_, f)) = s.poll_transmit() {
            if let Frame::WantTrees { ids } = f {
                asked.extend(ids);
            }
        }
        assert!(!asked.is_empty(), "the sink stopped asking without failing");
        let trees = asked.iter().map(|id| (*id, objects[id].clone())).collect();
        served += asked.len();
        if let Err(e) = s.handle_frame(Frame::Trees { trees }, now) {
            break e;
        }
    };
    assert!(matches!(err, SessionError::BadTree { .. }), "{err}");
    assert!(served <= sync_core::manifest::MAX_DEPTH + 1, "{served}");
    assert_failed_sink(&mut s, ErrorCode::BadData);
}
