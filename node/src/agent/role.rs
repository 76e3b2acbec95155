//! The agent role: exactly one device runs Claude requests for the mesh. The role is an
//! agent-role certificate with an epoch; the valid one with the highest epoch wins
//! ([`iom_protocol::trust`]), so assigning the role again simply issues a higher epoch.

use iom_protocol::cert::CertBody;
use iom_protocol::keys::{DeviceId, PersonKey};

use crate::api::ApiError;
use crate::node::NodeCtx;

/// Issues an agent-role certificate for `device` with the next epoch.
pub async fn assign(ctx: &NodeCtx, device: DeviceId) -> Result<u64, ApiError> {
    let (me, person, person_key) = {
        let id = ctx.identity();
        (
            id.device.id(),
            id.person,
            id.person_key.as_ref().map(PersonKey::seed),
        )
    };
    let state = ctx.trust.state();
    if person_key.is_none() && !state.is_admin(&me) {
        return Err(ApiError::forbidden(
            "only an admin device can assign the agent role; run this on an admin device",
        ));
    }
    if !state.is_trusted(&device) {
        return Err(ApiError::bad_request(format!(
            "{device} is not a trusted device of this mesh (see `iom devices`)"
        )));
    }
    let epoch = state.next_agent_epoch();
    let body = CertBody::AgentRole {
        person,
        device,
        epoch,
        issued_at: crate::time::now_secs(),
    };
    let cert = ctx
        .identity
        .issue(body)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    ctx.trust.add(vec![cert]).await?;
    Ok(epoch)
}

/// `(device, epoch)` of the current agent, if any.
pub fn holder(ctx: &NodeCtx) -> Option<(DeviceId, u64)> {
    ctx.trust.state().agent.map(|a| (a.device, a.epoch))
}

/// Whether this device holds the role; returns the epoch if so.
pub fn my_epoch(ctx: &NodeCtx) -> Option<u64> {
    let me = ctx.identity().device.id();
    holder(ctx).filter(|(d, _)| *d == me).map(|(_, e)| e)
}
