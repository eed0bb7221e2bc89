//! Attack: read an encrypted volume's data from its image on the worker's disk (or from a
//! snapshot's image) without going through its mount. Each volume here is a real ext4
//! image on a loop device; the encrypted one keeps its data under an fscrypt v2 policy
//! whose key is added at mount and removed at unmount.
//!
//! Proof that the test can fail: the same writes to a volume made without a key are
//! found in its image and its snapshot (the control below); with `unlock` changed to add
//! the key but skip the policy (the data directory left unencrypted), a mount of the
//! encrypted volume without its key listed the marker's directory in plaintext and the
//! test failed there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use berth_runtime::volume::{self, VolumeKey, VolumeLayout};

const SIZE: u64 = 64 << 20;

fn contains(path: &Path, needle: &[u8]) -> bool {
    let bytes = fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|window| window == needle)
}

/// Writes a marker file (and a directory name) through the worker's mount, syncs it and
/// answers where the Machine would see it.
fn write_marker(layout: &VolumeLayout, marker: &str) {
    let source = layout.machine_source(layout.key.is_some());
    let dir = source.join(format!("dir-{marker}"));
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("file"), marker.repeat(64)).unwrap();
    let file = fs::File::open(dir.join("file")).unwrap();
    file.sync_all().unwrap();
    // The filesystem's own metadata (names) too.
    rustix::fs::syncfs(&file).unwrap();
}

#[test]
fn an_encrypted_volume_keeps_no_plaintext_in_its_image_or_snapshots() {
    let tmp = tempfile::Builder::new()
        .prefix("berth-volcrypt-")
        .tempdir()
        .unwrap();
    let root = tmp.path().join("volumes");
    let marker = format!("berth-marker-{}", std::process::id());
    let mut found = Vec::new();
    for encrypted in [true, false] {
        let key = encrypted.then(|| VolumeKey::generate().unwrap());
        let id = format!("vol_{encrypted}");
        let layout = VolumeLayout::new(&root, &id).with_key(key.clone());
        volume::create(&layout, SIZE, None).unwrap();
        write_marker(&layout, &marker);
        let snapshot = tmp.path().join(format!("{id}.snap"));
        volume::snapshot(&layout, &snapshot).unwrap();
        // Plaintext where the Machine looks.
        let seen = fs::read_to_string(
            layout
                .machine_source(encrypted)
                .join(format!("dir-{marker}/file")),
        )
        .unwrap();
        assert_eq!(seen, marker.repeat(64));
        volume::unmount(&layout).unwrap();
        found.push((
            encrypted,
            contains(&layout.image(), marker.as_bytes()),
            contains(&snapshot, marker.as_bytes()),
        ));

        // A restore of the snapshot with the volume's key reads; the image mounted again
        // without it shows no plaintext names.
        let restored = VolumeLayout::new(&root, &format!("{id}-restored")).with_key(key);
        volume::create(&restored, 2 * SIZE, Some(&snapshot)).unwrap();
        let file = restored
            .machine_source(encrypted)
            .join(format!("dir-{marker}/file"));
        assert_eq!(fs::read_to_string(&file).unwrap(), marker.repeat(64));
        volume::remove(&restored).unwrap();
        if encrypted {
            let keyless = VolumeLayout::new(&root, &id);
            volume::mount(&keyless).unwrap();
            let names: Vec<String> = fs::read_dir(keyless.machine_source(true))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 1);
            assert!(!names[0].contains(&marker), "{names:?}");
        }
        volume::remove(&layout).unwrap();
    }
    assert_eq!(
        found,
        vec![(true, false, false), (false, true, true)],
        "(encrypted, plaintext in the image, plaintext in the snapshot)"
    );
}
