//! The status page at `GET /`: one self-contained HTML document (no external assets, no
//! network beyond the admin API it is served from) that polls `/api/v1/services` every two
//! seconds and renders services and backends for a person watching a deploy.

pub const PAGE: &str = include_str!("page.html");
