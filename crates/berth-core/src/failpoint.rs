//! Crash injection for tests: with the `failpoints` feature, a point named in
//! `BERTH_FAILPOINTS` (comma-separated) aborts the process on the spot, like a kill -9 at
//! exactly that step. `name=pause:MS` instead holds the thread there for MS milliseconds,
//! so a test can act inside a window that is otherwise too short to hit. Without the
//! feature it compiles to nothing. Each crate keeps the list of its own points.

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    let Ok(list) = std::env::var("BERTH_FAILPOINTS") else {
        return;
    };
    match action(&list, name) {
        Some(Action::Abort) => {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
        Some(Action::Pause(duration)) => {
            eprintln!("failpoint {name}: pausing {} ms", duration.as_millis());
            std::thread::sleep(duration);
        }
        None => {}
    }
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Abort,
    Pause(std::time::Duration),
}

/// What `list` (the variable's value) says to do at `name`.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn action(list: &str, name: &str) -> Option<Action> {
    list.split(',').find_map(|entry| {
        let (point, what) = entry.trim().split_once('=').unwrap_or((entry.trim(), ""));
        if point != name {
            return None;
        }
        match what.strip_prefix("pause:").map(str::parse::<u64>) {
            Some(Ok(ms)) => Some(Action::Pause(std::time::Duration::from_millis(ms))),
            _ => Some(Action::Abort),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn entries_name_a_point_and_what_to_do_there() {
        let list = "a.b, c.d=pause:250,e.f";
        assert_eq!(action(list, "a.b"), Some(Action::Abort));
        assert_eq!(
            action(list, "c.d"),
            Some(Action::Pause(Duration::from_millis(250)))
        );
        assert_eq!(action(list, "e.f"), Some(Action::Abort));
        assert_eq!(action(list, "c"), None);
        assert_eq!(action("", "a.b"), None);
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
