//! Reaching into the QEMU process from outside: system calls run inside it
//! ([`inject`]) and the userfaultfd it is made to create, operated from
//! thaw ([`uffd`]).

pub mod inject;
pub mod uffd;
