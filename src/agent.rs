//! HAProxy's agent-check (`control.agent`): HAProxy connects over TCP, tqproxy writes one line
//! ([`crate::drain::agent_reply`]: `ready up 100%`, `drain`, `maint`) and closes. Nothing is
//! read: HAProxy sends nothing unless `agent-send` is configured, and what it sends is ignored.
//!
//! A pingora service like the admin listener, so `tqproxy upgrade` hands its socket over.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;

use crate::supervisor::SupervisorHandle;

/// How long the status and the write may take before the connection is dropped (HAProxy's
/// `timeout check` is what bounds it on the other side).
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

pub struct Agent {
    supervisor: SupervisorHandle,
}

impl Agent {
    pub fn new(supervisor: SupervisorHandle) -> Agent {
        Agent { supervisor }
    }
}

#[async_trait]
impl ServerApp for Agent {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let answer = async {
            let st = self.supervisor.status().await;
            let line = crate::drain::agent_reply(st.as_ref(), crate::drain::drained());
            stream.write_all(line.as_bytes()).await?;
            stream.flush().await?;
            stream.shutdown().await
        };
        if let Err(e) = tokio::time::timeout(ANSWER_WITHIN, answer)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        {
            tracing::debug!(error = %e, "agent-check answer not delivered");
        }
        None
    }
}
