//! Crash recovery as one decision: what to do with a Machine's record, given what the host
//! shows. The agent asks [`plan`] for every record when it opens, after an operation that
//! failed halfway, and for the doctor's repair, then carries the step out.
//!
//! | recorded | found on host | step |
//! | --- | --- | --- |
//! | pending create | anything | [`Step::RollBackCreate`] |
//! | pending update | anything | [`Step::RollBackUpdate`] (kill first if running) |
//! | `starting`/`started` | running | [`Step::Adopt`] |
//! | `starting`/`started` | exited / gone | [`Step::RecordExit`] (restart policy applies) |
//! | `stopping` | running | [`Step::KillAndStop`] |
//! | `stopping` | exited / gone | [`Step::FinishStop`] (no restart policy) |
//! | `destroying` | anything | [`Step::FinishDestroy`] |
//! | `replacing`, nothing pending | anything | [`Step::SettleStopped`] |
//! | `stopped` with a restart due | anything | [`Step::ResumeRestart`] |
//! | `starting`/`started`/`stopping`, after a host restart | exited / gone | [`Step::StoppedByHostRestart`] |
//! | `suspending` | running | [`Step::CancelSuspend`] |
//! | `suspending` | exited / gone, memory image whole | [`Step::FinishSuspend`] |
//! | `suspending` | exited / gone, no image | [`Step::SuspendLost`] |
//! | `starting` | gone (no run began), memory image whole | [`Step::BackToSuspended`] |
//!
//! Everything else (`created`, `failed`, `suspended`, `stopped` with nothing due) is left
//! alone. A memory image is kept only where [`keeps_memory_image`] says so; the agent
//! discards it everywhere else, so no Machine resumes a past it has already gone on from.

use berth_api::MachineState::{self, *};

/// An operation recorded as in flight, to finish or undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    None,
    Create,
    Update,
}

/// What the record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordFacts {
    pub state: MachineState,
    pub pending: Pending,
    /// The restart policy is `always`.
    pub restart_always: bool,
    /// The restart policy was waiting out its back-off.
    pub restart_due: bool,
}

/// The Machine's process, as the runtime finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    Running,
    /// Ended, with its exit recorded by the supervisor.
    Exited,
    /// Nothing runs and no exit was recorded.
    Gone,
}

/// What the host shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// The host restarted since the agent last ran (a new boot id, or the run state in
    /// `/run` gone).
    pub restarted: bool,
    pub process: Process,
    /// A sealed memory image is in the Machine's directory (its integrity is checked only
    /// by a resume).
    pub memory_image: bool,
}

/// What recovery does with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The create never answered: remove everything of the Machine and its record.
    RollBackCreate,
    /// Put back the old config and bundle and record `stopped`; end the run first if
    /// `kill`.
    RollBackUpdate { kill: bool },
    /// It runs: watch it again, recording `started` first if the record says `starting`.
    Adopt { record_start: bool },
    /// The run ended by itself: record the exit and let the restart policy decide.
    RecordExit,
    /// The user's stop did not end the process: SIGKILL, then `stopped`.
    KillAndStop,
    /// The user's stop got past ending the process: `stopped`, no restart policy.
    FinishStop,
    /// Remove everything of the Machine and delete its record.
    FinishDestroy,
    /// An update without its pending record cannot happen; settle on `stopped`.
    SettleStopped,
    /// Schedule the rest of the restart policy's back-off.
    ResumeRestart,
    /// The run ended with the host: `stopped` with reason `host_restart`, started again
    /// only by policy `always`.
    StoppedByHostRestart { restart: bool },
    /// The checkpoint did not finish and the run goes on: `started` again.
    CancelSuspend,
    /// The checkpoint finished and the run ended with it: `suspended`, the run closed.
    FinishSuspend,
    /// The run ended without a whole memory image: `stopped`, with memory lost, no
    /// restart policy (a suspend was asked for, not a run).
    SuspendLost,
    /// A resume was recorded but no run began: `suspended` again, its image kept.
    BackToSuspended,
    /// Nothing to do.
    Nothing,
}

/// Whether [`plan`] looks at the process for this record. When it does not, the agent
/// need not ask the runtime.
pub fn reads_process(record: RecordFacts) -> bool {
    match record.pending {
        Pending::Create => false,
        Pending::Update => true,
        Pending::None => ran(record.state) || record.state == Suspending,
    }
}

/// Decides what recovery does with one record.
pub fn plan(record: RecordFacts, host: HostFacts) -> Step {
    let running = host.process == Process::Running;
    match record.pending {
        Pending::Create => return Step::RollBackCreate,
        Pending::Update => return Step::RollBackUpdate { kill: running },
        Pending::None => {}
    }
    // A memory image lives on disk and outlives the host's run state.
    match (record.state, host.process, host.memory_image) {
        (Suspending, Process::Running, _) => return Step::CancelSuspend,
        (Suspending, _, true) => return Step::FinishSuspend,
        (Suspending, _, false) => return Step::SuspendLost,
        (Starting, Process::Gone, true) => return Step::BackToSuspended,
        _ => {}
    }
    if host.restarted && ran(record.state) && !running {
        return Step::StoppedByHostRestart {
            restart: record.restart_always,
        };
    }
    match (record.state, running) {
        (Destroying, _) => Step::FinishDestroy,
        (Starting | Started, true) => Step::Adopt {
            record_start: record.state == Starting,
        },
        (Starting | Started, false) => Step::RecordExit,
        (Stopping, true) => Step::KillAndStop,
        (Stopping, false) => Step::FinishStop,
        (Replacing, _) => Step::SettleStopped,
        (Stopped, _) if record.restart_due => Step::ResumeRestart,
        (Created | Stopped | Failed | Destroyed | Suspended, _) => Step::Nothing,
        // Answered above.
        (Suspending, _) => Step::SuspendLost,
    }
}

/// Whether the Machine's memory image stays after `step`: only where the Machine is, or
/// goes back to, `suspended`. Anywhere else it is stale (the Machine ran on from it, or
/// will boot fresh) and resuming it would run the Machine's past a second time.
pub fn keeps_memory_image(record: RecordFacts, step: Step) -> bool {
    match step {
        Step::FinishSuspend | Step::BackToSuspended => true,
        Step::Nothing => record.state == Suspended && record.pending == Pending::None,
        _ => false,
    }
}

/// States in which the record says a process may run.
fn ran(state: MachineState) -> bool {
    matches!(state, Starting | Started | Stopping)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{can_transition, is_resting};

    const PROCESSES: [Process; 3] = [Process::Running, Process::Exited, Process::Gone];
    const PENDING: [Pending; 3] = [Pending::None, Pending::Create, Pending::Update];

    /// Every combination of record and host facts.
    fn every_case() -> Vec<(RecordFacts, HostFacts)> {
        let mut cases = Vec::new();
        for state in MachineState::ALL {
            for pending in PENDING {
                for restart_always in [false, true] {
                    for restart_due in [false, true] {
                        for restarted in [false, true] {
                            for process in PROCESSES {
                                for memory_image in [false, true] {
                                    cases.push((
                                        RecordFacts {
                                            state,
                                            pending,
                                            restart_always,
                                            restart_due,
                                        },
                                        HostFacts {
                                            restarted,
                                            process,
                                            memory_image,
                                        },
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
        cases
    }

    fn record(state: MachineState) -> RecordFacts {
        RecordFacts {
            state,
            pending: Pending::None,
            restart_always: false,
            restart_due: false,
        }
    }

    fn host(restarted: bool, process: Process) -> HostFacts {
        HostFacts {
            restarted,
            process,
            memory_image: false,
        }
    }

    /// The state a step leaves the record in; `None` when the record is deleted.
    fn settles_on(record: RecordFacts, step: Step) -> Option<MachineState> {
        match step {
            Step::RollBackCreate | Step::FinishDestroy => None,
            Step::Adopt { .. } | Step::CancelSuspend => Some(Started),
            Step::FinishSuspend | Step::BackToSuspended => Some(Suspended),
            Step::RollBackUpdate { .. }
            | Step::RecordExit
            | Step::KillAndStop
            | Step::FinishStop
            | Step::SettleStopped
            | Step::SuspendLost
            | Step::StoppedByHostRestart { .. } => Some(Stopped),
            Step::ResumeRestart | Step::Nothing => Some(record.state),
        }
    }

    #[test]
    fn an_unfinished_operation_is_undone_whatever_the_host_shows() {
        for (mut facts, host) in every_case() {
            facts.pending = Pending::Create;
            assert_eq!(
                plan(facts, host),
                Step::RollBackCreate,
                "{facts:?} {host:?}"
            );
            facts.pending = Pending::Update;
            assert_eq!(
                plan(facts, host),
                Step::RollBackUpdate {
                    kill: host.process == Process::Running
                },
                "{facts:?} {host:?}"
            );
        }
    }

    #[test]
    fn the_architecture_table_row_by_row() {
        for restarted in [false, true] {
            for state in [Starting, Started] {
                assert_eq!(
                    plan(record(state), host(restarted, Process::Running)),
                    Step::Adopt {
                        record_start: state == Starting
                    }
                );
            }
            assert_eq!(
                plan(record(Stopping), host(restarted, Process::Running)),
                Step::KillAndStop
            );
            for process in PROCESSES {
                assert_eq!(
                    plan(record(Destroying), host(restarted, process)),
                    Step::FinishDestroy
                );
                assert_eq!(
                    plan(record(Replacing), host(restarted, process)),
                    Step::SettleStopped
                );
            }
        }
        for process in [Process::Exited, Process::Gone] {
            for state in [Starting, Started] {
                assert_eq!(plan(record(state), host(false, process)), Step::RecordExit);
            }
            assert_eq!(
                plan(record(Stopping), host(false, process)),
                Step::FinishStop
            );
            for state in [Starting, Started, Stopping] {
                for restart_always in [false, true] {
                    let facts = RecordFacts {
                        restart_always,
                        ..record(state)
                    };
                    assert_eq!(
                        plan(facts, host(true, process)),
                        Step::StoppedByHostRestart {
                            restart: restart_always
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn resting_records_are_left_alone_but_for_a_due_restart() {
        for (facts, host) in every_case() {
            if facts.pending != Pending::None
                || !matches!(
                    facts.state,
                    Created | Stopped | Failed | Destroyed | Suspended
                )
            {
                continue;
            }
            let expected = if facts.state == Stopped && facts.restart_due {
                Step::ResumeRestart
            } else {
                Step::Nothing
            };
            assert_eq!(plan(facts, host), expected, "{facts:?} {host:?}");
        }
    }

    #[test]
    fn only_policy_always_restarts_after_a_host_restart() {
        for (facts, host) in every_case() {
            if let Step::StoppedByHostRestart { restart } = plan(facts, host) {
                assert!(host.restarted && host.process != Process::Running);
                assert_eq!(restart, facts.restart_always, "{facts:?}");
            }
        }
    }

    #[test]
    fn a_user_stop_never_brings_in_the_restart_policy() {
        for (facts, host) in every_case() {
            if facts.state == Stopping && facts.pending == Pending::None {
                assert!(
                    matches!(
                        plan(facts, host),
                        Step::KillAndStop | Step::FinishStop | Step::StoppedByHostRestart { .. }
                    ),
                    "{facts:?} {host:?}"
                );
            }
        }
    }

    #[test]
    fn the_process_is_read_only_where_it_changes_the_step() {
        for (facts, host) in every_case() {
            if reads_process(facts) {
                continue;
            }
            for process in PROCESSES {
                assert_eq!(
                    plan(facts, host),
                    plan(facts, HostFacts { process, ..host }),
                    "{facts:?} {host:?}"
                );
            }
        }
    }

    #[test]
    fn a_suspend_or_resume_cut_short_ends_started_suspended_or_stopped() {
        let with_image = |restarted, process| HostFacts {
            memory_image: true,
            ..host(restarted, process)
        };
        for restarted in [false, true] {
            // The checkpoint did not end the run: it goes on.
            for memory_image in [false, true] {
                let facts = HostFacts {
                    memory_image,
                    ..host(restarted, Process::Running)
                };
                assert_eq!(plan(record(Suspending), facts), Step::CancelSuspend);
            }
            for process in [Process::Exited, Process::Gone] {
                // The image was sealed: suspended, even across a host restart.
                assert_eq!(
                    plan(record(Suspending), with_image(restarted, process)),
                    Step::FinishSuspend
                );
                assert_eq!(
                    plan(record(Suspending), host(restarted, process)),
                    Step::SuspendLost
                );
            }
            // A resume recorded but never begun keeps its image.
            assert_eq!(
                plan(record(Starting), with_image(restarted, Process::Gone)),
                Step::BackToSuspended
            );
            // One that ran (its exit is recorded) never goes back to that image.
            assert_ne!(
                plan(record(Starting), with_image(restarted, Process::Exited)),
                Step::BackToSuspended
            );
            // A suspended Machine is left alone, its image kept; a running one never
            // keeps an image.
            assert_eq!(
                plan(record(Suspended), with_image(restarted, Process::Gone)),
                Step::Nothing
            );
        }
    }

    #[test]
    fn a_memory_image_is_kept_only_by_a_machine_that_ends_suspended() {
        for (facts, host) in every_case() {
            let step = plan(facts, host);
            let ends = settles_on(facts, step);
            assert_eq!(
                keeps_memory_image(facts, step),
                ends == Some(Suspended) && facts.pending == Pending::None,
                "{facts:?} {host:?} {step:?}"
            );
            // Never kept beside a running process: it would run the past twice.
            if host.process == Process::Running && keeps_memory_image(facts, step) {
                assert!(
                    facts.state == Suspended && step == Step::Nothing,
                    "{facts:?} {host:?}"
                );
            }
        }
    }

    #[test]
    fn every_step_ends_resting_along_edges_of_the_table() {
        for (facts, host) in every_case() {
            let step = plan(facts, host);
            let Some(end) = settles_on(facts, step) else {
                continue;
            };
            assert!(is_resting(end), "{facts:?} {host:?} ends {end}");
            // A pending operation's transitional state is the one its action entered.
            let from = match facts.pending {
                Pending::None => facts.state,
                Pending::Create => Created,
                Pending::Update => Replacing,
            };
            assert!(
                end == from || can_transition(from, end),
                "{facts:?} {host:?}: {from} -> {end} is not in the table"
            );
        }
    }
}
