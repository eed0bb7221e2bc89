//! Fixtures for tests and the bench: a real `docker-registry` on loopback, a private
//! PostgreSQL, a proxy that counts and misbehaves, and pushing images built in code.

pub mod postgres;
pub mod proxy;
pub mod push;
pub mod registry;

pub use postgres::{free_port, Postgres};
pub use proxy::{Fault, Proxy};
pub use push::{push_image, push_index, push_layout, PushTarget};
pub use registry::Registry;
