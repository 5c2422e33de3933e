//! `meshd demo` and `meshd backend`: the zero-downtime demonstration and the backend it
//! drives (also used by the tests and the Docker images).

pub mod backend;
pub mod scenario;
