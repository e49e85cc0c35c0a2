//! A health check's look at a container: never starts it.

use std::net::IpAddr;

use sallyport_runtime::sync::lock;

use super::{ContainerError, Containers};

impl Containers {
    /// For a health check, without starting anything: the container's address when it runs,
    /// `None` when it is stopped and may be started on demand, or why it is not available (its
    /// latest start failed, the engine cannot be reached).
    pub async fn check_target(&self, name: &str) -> Result<Option<IpAddr>, ContainerError> {
        let slot = self.slot(name)?;
        if lock(&slot.stats).last_start_failed {
            return Err(ContainerError::LastStartFailed(name.to_owned()));
        }
        self.inner.engine.running_address(&slot.spec()).await
    }
}
