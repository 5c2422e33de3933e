//! `meshd demo` and `meshd backend`: the zero-downtime demonstration and the backend it
//! drives (also used by the tests and the Docker images).
//!
//! ```text
//!  scenario.rs  the phases, in order, and their table (the demo's story; start here)
//!  load.rs      the clients and each phase's numbers; a minimal HTTP/1.1 client
//!  cluster.rs   the meshd child, its mesh.toml, the task processes, meshd's view
//!  backend.rs   `meshd backend`: the task the demo (and the tests) run
//! ```

pub mod backend;
mod cluster;
mod load;
pub mod scenario;
