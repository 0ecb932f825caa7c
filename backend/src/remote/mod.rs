//! Reaching into the QEMU process from outside: a handle that pins its
//! identity ([`process`]), system calls run inside it ([`inject`]) and the
//! userfaultfd it is made to create, operated from thaw ([`uffd`]).

pub mod inject;
pub mod process;
pub mod uffd;
