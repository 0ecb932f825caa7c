//! Watching a running guest's memory from outside QEMU, for working sets:
//! observation windows after a zap ([`window`], shared by a restore's
//! learning window and a checkpoint's trace), access-bit style scanning
//! ([`abit`]), write tracking ([`dirty`]) and QEMU's page tables read
//! from outside ([`pagemap`]).

pub(crate) mod abit;
pub(crate) mod dirty;
pub(crate) mod pagemap;
pub(crate) mod window;
