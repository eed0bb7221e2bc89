//! Run inside a Machine by `escapes_seccomp.rs`: tries what the seccomp profile must
//! refuse (and a few things it must allow) with raw syscalls and prints `name=ok` or
//! `name=errno:N` per try, then `done`. Built with plain `rustc` as a static binary, so
//! it needs nothing from the image but itself. x86_64 syscall numbers.

use std::os::raw::{c_int, c_long};

extern "C" {
    fn syscall(number: c_long, ...) -> c_long;
    fn __errno_location() -> *mut c_int;
}

const SOCKET: c_long = 41;
const SOCKETPAIR: c_long = 53;
const PERSONALITY: c_long = 135;
const IO_URING_SETUP: c_long = 425;
const IO_URING_ENTER: c_long = 426;
const IO_URING_REGISTER: c_long = 427;

const AF_UNIX: c_long = 1;
const AF_INET: c_long = 2;
const AF_INET6: c_long = 10;
const AF_NETLINK: c_long = 16;
const AF_ALG: c_long = 38;
const AF_VSOCK: c_long = 40;
const AF_XDP: c_long = 44;
const SOCK_STREAM: c_long = 1;
const SOCK_DGRAM: c_long = 2;
const SOCK_RAW: c_long = 3;
const SOCK_SEQPACKET: c_long = 5;

fn report(name: &str, result: c_long) {
    if result < 0 {
        // SAFETY: reads this thread's errno right after the call that set it.
        let errno = unsafe { *__errno_location() };
        println!("{name}=errno:{errno}");
    } else {
        println!("{name}=ok");
    }
}

fn main() {
    // SAFETY: each call passes plain integers or pointers to live local buffers; a
    // descriptor a call opens is leaked on purpose (the process exits right after).
    unsafe {
        let mut params = [0u8; 120];
        report("io_uring_setup", syscall(IO_URING_SETUP, 4 as c_long, params.as_mut_ptr()));
        report("io_uring_enter", syscall(IO_URING_ENTER, -1 as c_long, 0 as c_long, 0 as c_long, 0 as c_long, 0 as c_long, 0 as c_long));
        report("io_uring_register", syscall(IO_URING_REGISTER, -1 as c_long, 0 as c_long, 0 as c_long, 0 as c_long));
        report("socket_vsock", syscall(SOCKET, AF_VSOCK, SOCK_STREAM, 0 as c_long));
        // The kernel reads the family as an int: high bits must not slip past the filter.
        report("socket_vsock_high_bits", syscall(SOCKET, AF_VSOCK | (1 << 32), SOCK_STREAM, 0 as c_long));
        report("socket_alg", syscall(SOCKET, AF_ALG, SOCK_SEQPACKET, 0 as c_long));
        report("socket_xdp", syscall(SOCKET, AF_XDP, SOCK_RAW, 0 as c_long));
        let mut pair = [0 as c_int; 2];
        report("socketpair_vsock", syscall(SOCKETPAIR, AF_VSOCK, SOCK_STREAM, 0 as c_long, pair.as_mut_ptr()));
        report("personality_read_implies_exec", syscall(PERSONALITY, 0x0400000 as c_long));
        report("personality_addr_no_randomize", syscall(PERSONALITY, 0x0040000 as c_long));
        // What ordinary programs do must still work.
        report("socket_unix", syscall(SOCKET, AF_UNIX, SOCK_STREAM, 0 as c_long));
        report("socket_inet", syscall(SOCKET, AF_INET, SOCK_DGRAM, 0 as c_long));
        report("socket_inet6", syscall(SOCKET, AF_INET6, SOCK_STREAM, 0 as c_long));
        report("socket_netlink", syscall(SOCKET, AF_NETLINK, SOCK_RAW, 0 as c_long));
        report("socketpair_unix", syscall(SOCKETPAIR, AF_UNIX, SOCK_STREAM, 0 as c_long, pair.as_mut_ptr()));
        report("personality_query", syscall(PERSONALITY, 0xffff_ffff as c_long));
        report("personality_linux", syscall(PERSONALITY, 0 as c_long));
    }
    println!("done");
}
