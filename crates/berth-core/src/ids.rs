//! Identifiers. Machine ids look like Fly's (14 lower-case hex digits); instance ids are
//! time-ordered so that a newer instance of a Machine sorts after an older one.

use rand::Rng;

/// A new random Machine id: 14 lower-case hex digits.
pub fn new_machine_id() -> String {
    let value: u64 = rand::thread_rng().gen::<u64>() & 0x00ff_ffff_ffff_ffff;
    format!("{value:014x}")
}

/// A new random volume id, in Fly's form (`vol_` and 16 lowercase letters or digits).
pub fn new_volume_id() -> String {
    format!("vol_{}", random_base36(16))
}

/// A new random volume snapshot id (`vs_` and 16 lowercase letters or digits).
pub fn new_snapshot_id() -> String {
    format!("vs_{}", random_base36(16))
}

/// A new random checkpoint id of a Machine's disk (`cp_` and 16 lowercase letters or
/// digits).
pub fn new_checkpoint_id() -> String {
    format!("cp_{}", random_base36(16))
}

fn random_base36(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect()
}

/// A new random App id.
pub fn new_app_id() -> String {
    format!("app_{:016x}", rand::thread_rng().gen::<u64>())
}

/// A new instance id: 48 bits of milliseconds then 80 random bits, in Crockford base32
/// (26 characters, like a ULID), so ids issued later sort later.
pub fn new_instance_id(now_ms: u64) -> String {
    let random: u128 = rand::thread_rng().gen::<u128>() & ((1u128 << 80) - 1);
    let value = (u128::from(now_ms & 0xffff_ffff_ffff) << 80) | random;
    encode_crockford(value)
}

fn encode_crockford(mut value: u128) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut out = [0u8; 26];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value & 31) as usize];
        value >>= 5;
    }
    out.iter().map(|&byte| char::from(byte)).collect()
}

/// Whether `text` has the shape of a Machine id. Used to answer garbage with 404 before
/// touching any store.
pub fn is_machine_id(text: &str) -> bool {
    text.len() == 14
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `text` has the shape of an id made by [`new_volume_id`] (`prefix` `vol_`) or
/// [`new_snapshot_id`] (`vs_`).
pub fn has_id_shape(text: &str, prefix: &str) -> bool {
    text.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 16
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_and_snapshot_ids_have_flys_shape() {
        let volume = new_volume_id();
        assert!(has_id_shape(&volume, "vol_"), "{volume}");
        assert!(!has_id_shape(&volume, "vs_"));
        assert!(has_id_shape(&new_snapshot_id(), "vs_"));
        assert!(!has_id_shape("vol_../../etc", "vol_"));
        assert!(!has_id_shape("vol_ABCDEFGHIJKLMNOP", "vol_"));
        assert_ne!(new_volume_id(), volume);
    }

    #[test]
    fn machine_ids_have_the_fly_shape() {
        for _ in 0..100 {
            let id = new_machine_id();
            assert!(is_machine_id(&id), "{id}");
        }
        assert!(!is_machine_id("../etc/passwd"));
        assert!(!is_machine_id("148ED123A13E89"));
    }

    #[test]
    fn instance_ids_sort_by_time() {
        let older = new_instance_id(1_000);
        let newer = new_instance_id(2_000);
        assert_eq!(older.len(), 26);
        assert!(older < newer);
    }
}
