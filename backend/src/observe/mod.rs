//! Watching a running guest's memory from outside QEMU, for working-set
//! estimates: write tracking ([`dirty`]).

pub mod dirty;
