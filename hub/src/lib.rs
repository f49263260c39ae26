//! The unified-sync hub: one canonical copy of each user's balance, points, profile, roles
//! and settings, served over HTTP to every site. Layers, outermost first:
//! `server` (connections, TLS) → `http` (routes, CORS, limits, errors) → `events` (realtime
//! streams) → `domain` (every rule) → `store` (durable records behind a trait).

pub mod auth;
pub mod bounded;
pub mod check;
pub mod config;
pub mod domain;
pub mod events;
pub mod http;
pub mod import;
pub mod limit;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
pub mod time;
pub mod tls;
pub mod webhooks;

pub use http::App;
pub use server::serve;
