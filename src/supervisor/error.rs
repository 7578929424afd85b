//! What can go wrong when the supervisor is asked for something, as data.
//!
//! Every variant names what it is about (worker, instance, generation) so the message a person
//! reads is built in one place ([`std::fmt::Display`]), and the [`ErrorKind`] travels over the
//! control socket next to that message, so the CLI decides its exit code from the kind, never
//! from the text.

/// Defined with the status document (plain data below the supervisor, which `OutcomeLine`
/// carries); re-exported here and as `crate::supervisor::ErrorKind`.
pub use crate::status::ErrorKind;

/// A failed supervisor operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("no worker named `{worker}`")]
    NoSuchWorker { worker: String },
    /// `deploy` of a worker the configuration on disk does not have.
    #[error("no worker named `{worker}` in {dir}")]
    NotInConfig { worker: String, dir: String },
    /// `deploy` of a worker on disk that this process does not run yet.
    #[error("worker `{worker}` is not running; use `tqproxy reload` to add it")]
    NotRunning { worker: String },
    #[error("worker `{worker}` already exists")]
    WorkerExists { worker: String },
    #[error("worker `{worker}` is being removed")]
    WorkerRemoving { worker: String },
    #[error("worker `{worker}` is busy ({what}); try again when it is done")]
    Busy { worker: String, what: String },
    #[error("tqproxy is shutting down")]
    ShuttingDown,
    /// The process could not be started at all (no port, no cgroup, spawn failed).
    #[error(
        "worker `{worker}` instance {instance} (generation {generation}) failed to start: {cause}"
    )]
    StartFailed {
        worker: String,
        instance: u64,
        generation: u64,
        cause: String,
    },
    /// It started but never became ready (exited, health check failed, start timeout).
    #[error(
        "worker `{worker}` instance {instance} (generation {generation}) did not become ready: {reason}"
    )]
    NotReady {
        worker: String,
        instance: u64,
        generation: u64,
        reason: String,
    },
    /// A deploy of `generation` did not complete; `outcome` says what serves now.
    #[error("worker `{worker}`: generation {generation} failed to start ({cause}); {outcome}")]
    DeployFailed {
        worker: String,
        generation: u64,
        cause: Box<SupervisorError>,
        outcome: String,
    },
    /// A canary was rolled back (a limit broken, or `abort`); the old generation serves.
    #[error(
        "worker `{worker}`: canary generation {generation} rolled back: {reason}; generation {baseline} keeps serving"
    )]
    CanaryRolledBack {
        worker: String,
        generation: u64,
        baseline: u64,
        reason: String,
    },
    /// `promote`/`abort` of a worker with no canary deploy running.
    #[error("worker `{worker}` has no canary deploy running")]
    NoCanary { worker: String },
    #[error(
        "nothing to roll back to: worker `{worker}` has not been deployed since tqproxy started"
    )]
    NothingToRollBack { worker: String },
    /// The configuration on disk does not load or does not check; nothing changed.
    #[error("configuration invalid, nothing changed:\n{0}")]
    InvalidConfig(String),
    /// The request itself is wrong (a control-socket message, an argument).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Anything else (an I/O error on the way); the text is for a person.
    #[error("{0}")]
    Internal(String),
}

impl SupervisorError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SupervisorError::NoSuchWorker { .. }
            | SupervisorError::NotInConfig { .. }
            | SupervisorError::NotRunning { .. } => ErrorKind::NoSuchWorker,
            SupervisorError::WorkerExists { .. } | SupervisorError::WorkerRemoving { .. } => {
                ErrorKind::WorkerExists
            }
            SupervisorError::Busy { .. } => ErrorKind::Busy,
            SupervisorError::ShuttingDown => ErrorKind::ShuttingDown,
            SupervisorError::StartFailed { .. } => ErrorKind::StartFailed,
            SupervisorError::NotReady { .. } => ErrorKind::NotReady,
            SupervisorError::DeployFailed { .. } | SupervisorError::CanaryRolledBack { .. } => {
                ErrorKind::DeployFailed
            }
            SupervisorError::NoCanary { .. } => ErrorKind::NoCanary,
            SupervisorError::NothingToRollBack { .. } => ErrorKind::NothingToRollBack,
            SupervisorError::InvalidConfig(_) => ErrorKind::InvalidConfig,
            SupervisorError::BadRequest(_) => ErrorKind::BadRequest,
            SupervisorError::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl crate::status::Failure for SupervisorError {
    fn kind(&self) -> ErrorKind {
        SupervisorError::kind(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_they_are_about() {
        let e = SupervisorError::NotReady {
            worker: "api".into(),
            instance: 7,
            generation: 3,
            reason: "exited with status 1".into(),
        };
        assert_eq!(
            e.to_string(),
            "worker `api` instance 7 (generation 3) did not become ready: exited with status 1"
        );
        assert_eq!(e.kind(), ErrorKind::NotReady);
        let d = SupervisorError::DeployFailed {
            worker: "api".into(),
            generation: 4,
            cause: Box::new(e),
            outcome: "generation 3 keeps serving".into(),
        };
        assert!(d.to_string().ends_with("; generation 3 keeps serving"));
        assert_eq!(d.kind(), ErrorKind::DeployFailed);
    }

    #[test]
    fn kinds_round_trip_as_snake_case() {
        for k in ErrorKind::ALL {
            let s = serde_json::to_string(&k).unwrap();
            assert_eq!(s, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&s).unwrap(), k);
        }
    }

    #[test]
    fn exit_codes_tell_kinds_apart() {
        let codes = [
            ErrorKind::NoSuchWorker.exit_code(),
            ErrorKind::Busy.exit_code(),
            ErrorKind::ShuttingDown.exit_code(),
            ErrorKind::StartFailed.exit_code(),
            ErrorKind::InvalidConfig.exit_code(),
        ];
        let mut uniq = codes.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), codes.len(), "{codes:?}");
        // 3 is "cannot reach tqproxy" in the CLI, 0 is success.
        assert!(!codes.contains(&0) && !codes.contains(&3));
    }
}
