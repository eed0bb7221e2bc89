//! Crash injection for tests: with the `failpoints` feature, a point named in
//! `BERTH_FAILPOINTS` (comma-separated) aborts the process on the spot, like a kill -9 at
//! exactly that step. Without the feature it compiles to nothing. Each crate keeps the
//! list of its own points.

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    let Ok(list) = std::env::var("BERTH_FAILPOINTS") else {
        return;
    };
    if list.split(',').any(|point| point.trim() == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
