//! The Machine lifecycle as one table.
//!
//! ```text
//! created ──start──▶ starting ──▶ started ──stop──▶ stopping ──▶ stopped
//!    │                  │  ▲          │  (exit)          ▲          │
//!    │                  │  └──────────┼───────────start──┼──────────┘
//!    │                  ▼             ▼                  │
//!    │               failed        stopped             stop
//!    │                  ▲             │                  │
//!    │                  │          suspend ─▶ suspending ─▶ suspended
//!    │                  └──────────────────────start─────────┘ (resumes)
//!    └─update─▶ replacing ──▶ created | stopped | starting
//! any resting state ──destroy──▶ destroying ──▶ destroyed
//! ```
//!
//! `suspended` is resting with nothing running: its memory image is on disk. Start resumes
//! from it (or boots fresh when the image is lost), stop discards it, update and destroy
//! discard it with the rest.
//!
//! [`TRANSITIONS`] lists every allowed edge; [`plan`] maps a user action onto it and says
//! whether the action proceeds, is already satisfied (start and stop are idempotent,
//! because robots retry), or is refused.

use berth_api::MachineState::{self, *};

/// Every allowed state change, and nothing else.
pub const TRANSITIONS: &[(MachineState, MachineState)] = &[
    (Created, Starting),
    (Created, Replacing),
    (Created, Destroying),
    (Starting, Started),
    (Starting, Stopped),
    (Starting, Failed),
    (Started, Stopping),
    (Started, Stopped),
    (Started, Replacing),
    (Started, Destroying),
    (Stopping, Stopped),
    (Stopping, Failed),
    (Stopped, Starting),
    (Stopped, Replacing),
    (Stopped, Destroying),
    (Replacing, Created),
    (Replacing, Stopped),
    (Replacing, Starting),
    (Replacing, Failed),
    (Failed, Starting),
    (Failed, Replacing),
    (Failed, Destroying),
    (Destroying, Destroyed),
    (Started, Suspending),
    (Suspending, Suspended),
    // The checkpoint failed and the run goes on, or it failed and took the run with it.
    (Suspending, Started),
    (Suspending, Stopped),
    (Suspended, Starting),
    // Stop discards the memory image; nothing runs to signal.
    (Suspended, Stopping),
    (Suspended, Replacing),
    (Suspended, Destroying),
    // Recovery: a resume recorded but never begun still has its image whole.
    (Starting, Suspended),
];

pub fn can_transition(from: MachineState, to: MachineState) -> bool {
    TRANSITIONS.contains(&(from, to))
}

/// What a user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Update,
    Destroy {
        force: bool,
    },
    /// Checkpoint a started Machine with its memory, to resume at its next start.
    Suspend,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Update => "update",
            Action::Destroy { .. } => "destroy",
            Action::Suspend => "suspend",
        }
    }
}

/// What to do with an action in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionPlan {
    /// Enter this transitional state and do the work.
    Proceed(MachineState),
    /// Nothing to do: the Machine is already where the action would take it.
    AlreadyDone,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("cannot {verb} a machine that is {state}")]
    Invalid {
        verb: &'static str,
        state: MachineState,
    },
    #[error("cannot destroy a started machine without force; stop it first or pass force=true")]
    NeedsForce,
}

impl StateError {
    pub fn state(&self) -> MachineState {
        match self {
            StateError::Invalid { state, .. } => *state,
            StateError::NeedsForce => Started,
        }
    }

    /// A transitional state will end by itself, so the same call may succeed soon.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.state(),
            Starting | Stopping | Replacing | Destroying | Suspending
        )
    }
}

/// Decides an action against the current state.
pub fn plan(state: MachineState, action: Action) -> Result<ActionPlan, StateError> {
    let refuse = || StateError::Invalid {
        verb: action.verb(),
        state,
    };
    // Work in flight finishes (or is recovered) before another action may begin.
    if !is_resting(state) {
        return Err(refuse());
    }
    let target = match (action, state) {
        (Action::Start, Started)
        | (Action::Stop, Stopped | Created | Failed)
        | (Action::Suspend, Suspended) => return Ok(ActionPlan::AlreadyDone),
        (Action::Suspend, Started) => Suspending,
        (Action::Suspend, _) => return Err(refuse()),
        (Action::Start, _) => Starting,
        (Action::Stop, _) => Stopping,
        (Action::Update, _) => Replacing,
        (Action::Destroy { force: false }, Started) => return Err(StateError::NeedsForce),
        (Action::Destroy { .. }, _) => Destroying,
    };
    if can_transition(state, target) {
        Ok(ActionPlan::Proceed(target))
    } else {
        Err(refuse())
    }
}

/// States in which no work is in flight (a started Machine's process runs on by itself).
pub fn is_resting(state: MachineState) -> bool {
    matches!(
        state,
        Created | Started | Stopped | Failed | Destroyed | Suspended
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_and_stop_are_idempotent() {
        assert_eq!(plan(Started, Action::Start), Ok(ActionPlan::AlreadyDone));
        assert_eq!(plan(Stopped, Action::Stop), Ok(ActionPlan::AlreadyDone));
        assert_eq!(plan(Created, Action::Stop), Ok(ActionPlan::AlreadyDone));
    }

    #[test]
    fn the_normal_cycle_is_allowed() {
        assert_eq!(
            plan(Created, Action::Start),
            Ok(ActionPlan::Proceed(Starting))
        );
        assert!(can_transition(Starting, Started));
        assert_eq!(
            plan(Started, Action::Stop),
            Ok(ActionPlan::Proceed(Stopping))
        );
        assert!(can_transition(Stopping, Stopped));
        assert_eq!(
            plan(Stopped, Action::Start),
            Ok(ActionPlan::Proceed(Starting))
        );
    }

    #[test]
    fn in_flight_states_refuse_with_a_retryable_error() {
        for state in [Starting, Stopping, Replacing, Destroying, Suspending] {
            for action in [Action::Start, Action::Stop, Action::Update, Action::Suspend] {
                let error = plan(state, action).expect_err("refused");
                assert!(error.is_transient(), "{state} {action:?}");
            }
        }
    }

    #[test]
    fn destroyed_is_terminal() {
        for action in [
            Action::Start,
            Action::Stop,
            Action::Update,
            Action::Destroy { force: true },
            Action::Suspend,
        ] {
            if action == Action::Stop {
                continue;
            }
            assert!(plan(Destroyed, action).is_err(), "{action:?}");
        }
        assert!(TRANSITIONS.iter().all(|(from, _)| *from != Destroyed));
    }

    #[test]
    fn destroying_a_started_machine_needs_force() {
        assert_eq!(
            plan(Started, Action::Destroy { force: false }),
            Err(StateError::NeedsForce)
        );
        assert_eq!(
            plan(Started, Action::Destroy { force: true }),
            Ok(ActionPlan::Proceed(Destroying))
        );
    }

    #[test]
    fn suspend_resume_and_the_ways_out_of_suspended() {
        assert_eq!(
            plan(Started, Action::Suspend),
            Ok(ActionPlan::Proceed(Suspending))
        );
        assert!(can_transition(Suspending, Suspended));
        // Idempotent, as start and stop are.
        assert_eq!(
            plan(Suspended, Action::Suspend),
            Ok(ActionPlan::AlreadyDone)
        );
        // Only a running Machine has memory to keep; refused, and not worth a retry.
        for state in [Created, Stopped, Failed] {
            let error = plan(state, Action::Suspend).expect_err("refused");
            assert!(!error.is_transient(), "{state}");
            assert_eq!(
                error.to_string(),
                format!("cannot suspend a machine that is {state}")
            );
        }
        // Start resumes; stop discards the image; update and destroy need no force.
        assert_eq!(
            plan(Suspended, Action::Start),
            Ok(ActionPlan::Proceed(Starting))
        );
        assert_eq!(
            plan(Suspended, Action::Stop),
            Ok(ActionPlan::Proceed(Stopping))
        );
        assert_eq!(
            plan(Suspended, Action::Update),
            Ok(ActionPlan::Proceed(Replacing))
        );
        assert_eq!(
            plan(Suspended, Action::Destroy { force: false }),
            Ok(ActionPlan::Proceed(Destroying))
        );
        // A failed checkpoint goes back to running, or on to stopped with the run.
        assert!(can_transition(Suspending, Started));
        assert!(can_transition(Suspending, Stopped));
        assert!(
            !can_transition(Suspended, Started),
            "a resume passes through starting"
        );
    }

    #[test]
    fn suspended_is_reachable_only_through_suspending_or_a_resume_never_begun() {
        let into: Vec<MachineState> = TRANSITIONS
            .iter()
            .filter(|(_, to)| *to == Suspended)
            .map(|(from, _)| *from)
            .collect();
        assert_eq!(into, [Suspending, Starting]);
        let into: Vec<MachineState> = TRANSITIONS
            .iter()
            .filter(|(_, to)| *to == Suspending)
            .map(|(from, _)| *from)
            .collect();
        assert_eq!(into, [Started]);
    }

    #[test]
    fn every_state_on_the_way_to_suspended_can_reach_started_or_stopped() {
        for state in MachineState::ALL {
            if matches!(state, Destroying | Destroyed) {
                continue;
            }
            let reach = reachable(state);
            assert!(
                reach.contains(&Started) && reach.contains(&Stopped),
                "{state} reaches only {reach:?}"
            );
        }
        // And a suspended Machine is reached from the start.
        assert!(reachable(Created).contains(&Suspended));
    }

    fn reachable(state: MachineState) -> Vec<MachineState> {
        let mut seen = vec![state];
        let mut frontier = vec![state];
        while let Some(current) = frontier.pop() {
            for &(from, to) in TRANSITIONS {
                if from == current && !seen.contains(&to) {
                    seen.push(to);
                    frontier.push(to);
                }
            }
        }
        seen
    }

    #[test]
    fn every_planned_target_is_in_the_table() {
        let actions = [
            Action::Start,
            Action::Stop,
            Action::Update,
            Action::Destroy { force: true },
            Action::Destroy { force: false },
            Action::Suspend,
        ];
        for state in MachineState::ALL {
            for action in actions {
                if let Ok(ActionPlan::Proceed(target)) = plan(state, action) {
                    assert!(can_transition(state, target), "{state} -> {target}");
                }
            }
        }
    }

    #[test]
    fn every_state_but_destroyed_can_reach_destroyed() {
        for state in MachineState::ALL {
            let mut seen = vec![state];
            let mut frontier = vec![state];
            while let Some(current) = frontier.pop() {
                for &(from, to) in TRANSITIONS {
                    if from == current && !seen.contains(&to) {
                        seen.push(to);
                        frontier.push(to);
                    }
                }
            }
            assert!(seen.contains(&Destroyed), "{state} cannot be destroyed");
        }
    }

    #[test]
    fn only_resting_states_accept_actions_and_every_one_of_them_is_left_somehow() {
        for state in MachineState::ALL {
            let outgoing = TRANSITIONS.iter().any(|(from, _)| *from == state);
            assert_eq!(outgoing, state != Destroyed, "{state}");
        }
        assert!(is_resting(Suspended) && !is_resting(Suspending));
    }
}
