//! Random layers with hostile paths never write outside the destination or panic.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::path::Path;

use berth_image::{unpack_layer, LayerBuilder, UnpackLimits};
use common::{header, link_header, Sandbox};
use proptest::prelude::*;
use tar::EntryType;

const NAMES: &[&str] = &["pta", "ptb", "ptc"];

#[derive(Debug, Clone)]
enum Op {
    File(String),
    Dir(String),
    Symlink(String, String),
    Hardlink(String, String),
    Whiteout(String),
    Opaque(String),
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(NAMES).prop_map(str::to_string),
        1 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just(String::new()),
    ]
}

fn path() -> impl Strategy<Value = String> {
    // Mostly plausible paths, so that layers get far enough for entries to interact.
    (
        proptest::bool::weighted(0.1),
        proptest::collection::vec(component(), 1..5),
    )
        .prop_map(|(absolute, parts)| {
            let joined = parts.join("/");
            if absolute {
                format!("/{joined}")
            } else {
                joined
            }
        })
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/".to_string()),
        Just("/tmp".to_string()),
        Just("..".to_string()),
        Just("../..".to_string()),
        Just("../sentinel".to_string()),
        Just("../sentinel/file".to_string()),
        path(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => path().prop_map(Op::File),
        2 => path().prop_map(Op::Dir),
        3 => (path(), target()).prop_map(|(p, t)| Op::Symlink(p, t)),
        2 => (path(), path()).prop_map(|(p, t)| Op::Hardlink(p, t)),
        1 => path().prop_map(Op::Whiteout),
        1 => path().prop_map(Op::Opaque),
    ]
}

fn layer(ops: &[Op]) -> LayerBuilder {
    let mut layer = LayerBuilder::new();
    for op in ops {
        layer = match op {
            Op::File(p) => layer.raw_entry(header(EntryType::Regular, 0o644), p.as_bytes(), b"pt"),
            Op::Dir(p) => layer.raw_entry(header(EntryType::Directory, 0o755), p.as_bytes(), b""),
            Op::Symlink(p, t) => layer.raw_entry(
                link_header(EntryType::Symlink, t.as_bytes()),
                p.as_bytes(),
                b"",
            ),
            Op::Hardlink(p, t) => layer.raw_entry(
                link_header(EntryType::Link, t.as_bytes()),
                p.as_bytes(),
                b"",
            ),
            Op::Whiteout(p) => layer.raw_entry(
                header(EntryType::Regular, 0o644),
                format!("{p}/.wh.{}", NAMES[0]).as_bytes(),
                b"",
            ),
            Op::Opaque(p) => layer.raw_entry(
                header(EntryType::Regular, 0o644),
                format!("{p}/.wh..wh..opq").as_bytes(),
                b"",
            ),
        };
    }
    layer
}

fn assert_no_escape(sandbox: &Sandbox) {
    sandbox.assert_untouched();
    let parent = sandbox.base.path().parent().unwrap().to_path_buf();
    for name in NAMES {
        for dir in [Path::new("/"), Path::new("/tmp"), parent.as_path()] {
            assert!(
                std::fs::symlink_metadata(dir.join(name)).is_err(),
                "{} was created",
                dir.join(name).display()
            );
        }
    }
}

proptest! {

    #[test]
    fn random_layers_stay_inside_dest(ops in proptest::collection::vec(op(), 1..12)) {
        let sandbox = Sandbox::new();
        let tar = layer(&ops).into_tar().unwrap();
        let result = unpack_layer(tar.as_slice(), &sandbox.dest, &UnpackLimits::default());
        if let Err(e) = &result {
            prop_assert!(
                matches!(e.code(), "invalid_image"),
                "unexpected error class: {e}"
            );
        }
        assert_no_escape(&sandbox);
    }
}
