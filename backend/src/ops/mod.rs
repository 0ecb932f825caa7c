//! The operations a user asks for, as orchestration over the other
//! modules: [`save`], [`restore`], [`recover`], [`checkpoint`] (and its
//! continuous [`series`]), [`track`].
//! Each drives QEMU ([`crate::vmm`]), attaches to it ([`crate::remote`]) and
//! moves pages with the [`crate::engine`]; none installs a page itself.
//! Each holds the VM's [`owner`] lock while it runs.

pub mod checkpoint;
pub mod owner;
pub mod recover;
pub mod restore;
pub mod save;
pub mod series;
pub mod track;
