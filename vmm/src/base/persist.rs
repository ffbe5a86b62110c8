//! The state a component carries through a snapshot, a migration or a restore.
//!
//! Each component that has state worth keeping implements [`Persist`] in its own module (a
//! vCPU, a device, the policy's credit, guest memory's regions, the notices); the snapshot
//! module composes their states into a VM's and builds a VM back from them. Nothing outside a
//! component reaches into its fields to save or restore it.

/// A component's saved state, and how the component is built again from it.
pub(crate) trait Persist: Sized {
    /// What is saved (serializable, owned by the snapshot).
    type State;
    /// What a restore needs besides the state (the restored VM's handles, memory, setup).
    type Args<'a>;
    /// Why a save or a restore failed.
    type Error;

    /// The component's state now. Callers quiesce the component first when it can change.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Builds the component from `state`.
    fn restore(args: Self::Args<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}
