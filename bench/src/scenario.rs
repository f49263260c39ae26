//! What the load generator asks: one request shape per benchmark scenario, each as a
//! site's page would send it — a token the site signed for the user, the site's `Origin`,
//! spread over many users.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use clap::ValueEnum;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, IF_NONE_MATCH, ORIGIN};
use hyper::{Method, Request};

/// The site every benchmark request comes from; `cargo xtask bench` configures it.
pub const SITE: &str = "bench";
/// The site's page origin, allowed by the benchmark config.
pub const ORIGIN_URL: &str = "http://bench.localhost";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// A tab return: `timestamp` for balance, profile and roles in one request.
    Timestamp,
    /// `get` of one record, always answered in full.
    Get,
    /// `get` with an `If-None-Match` that matches (`*`: the profile exists; its own tag names
    /// the hub's epoch, which the load generator does not know): `304`, no body.
    GetNotModified,
    /// A merge-patch `push` of the profile.
    Push,
    /// A durable balance `delta` with a fresh `op_id`.
    Delta,
}

/// Builds the requests of one scenario for `users` users.
pub struct Requests {
    scenario: Scenario,
    host: HeaderValue,
    /// One bearer header per user, signed once up front.
    tokens: Vec<HeaderValue>,
    /// Tells this process's `op_id`s apart from any earlier run's on the same data dir.
    run: u64,
}

pub fn user_id(user: usize) -> String {
    format!("bench-{user}")
}

impl Requests {
    /// Signs a token per user with the site key from the hub's config file: the site's
    /// backend's, which may credit (a page's could not).
    pub fn new(scenario: Scenario, host: &str, config: &Path, users: usize) -> anyhow::Result<Requests> {
        let config = hub::config::Config::load(Some(config))?;
        let keys = hub::auth::Keys::from_config(&config)?;
        let tokens = (0..users)
            .map(|u| {
                let token = keys.mint_scoped(SITE, &user_id(u), 24 * 3600, protocol::Scopes::ALL, false)?;
                HeaderValue::from_str(&format!("Bearer {token}")).context("a token is a header value")
            })
            .collect::<anyhow::Result<_>>()?;
        let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
        Ok(Requests { scenario, host: HeaderValue::from_str(host)?, tokens, run })
    }

    /// The `n`th request of connection `conn`: users are visited in turn, each connection
    /// starting at its own offset.
    pub fn build(&self, conn: usize, n: u64) -> Request<Full<Bytes>> {
        self.build_for((conn.wrapping_mul(7919) + n as usize) % self.tokens.len(), conn, n)
    }

    /// The `n`th request of connection `conn`, for `user`.
    pub fn build_for(&self, user: usize, conn: usize, n: u64) -> Request<Full<Bytes>> {
        let id = user_id(user);
        let builder = Request::builder()
            .header(HOST, self.host.clone())
            .header(ORIGIN, HeaderValue::from_static(ORIGIN_URL))
            .header(AUTHORIZATION, self.tokens[user].clone());
        let (builder, body) = match self.scenario {
            Scenario::Timestamp => (
                builder.method(Method::GET).uri(format!(
                    "/api/sync.php?action=timestamp&user_id={id}&data_type=balance,profile,roles"
                )),
                Bytes::new(),
            ),
            Scenario::Get => (
                builder
                    .method(Method::GET)
                    .uri(format!("/api/sync.php?action=get&user_id={id}&data_type=profile")),
                Bytes::new(),
            ),
            Scenario::GetNotModified => (
                builder
                    .method(Method::GET)
                    .uri(format!("/api/sync.php?action=get&user_id={id}&data_type=profile"))
                    .header(IF_NONE_MATCH, HeaderValue::from_static("*")),
                Bytes::new(),
            ),
            Scenario::Push => (
                post(builder),
                Bytes::from(format!(
                    r#"{{"action":"push","user_id":"{id}","site_id":"{SITE}","data_type":"profile","data":{{"bio":"Claimed {n} times today"}}}}"#
                )),
            ),
            Scenario::Delta => (
                post(builder),
                Bytes::from(format!(
                    r#"{{"action":"delta","user_id":"{id}","site_id":"{SITE}","data_type":"balance","delta":{{"coins":1}},"op_id":"{}-{conn}-{n}","reason":"bench"}}"#,
                    self.run
                )),
            ),
        };
        builder.body(Full::new(body)).expect("a benchmark request is well formed")
    }
}

impl Requests {
    /// The bearer header of `user`'s token (users are counted modulo those signed).
    pub fn authorization(&self, user: usize) -> HeaderValue {
        self.tokens[user % self.tokens.len()].clone()
    }

    /// The writes that give `user` a balance and a profile, each at version 1.
    pub fn seed(&self, user: usize) -> [Request<Full<Bytes>>; 2] {
        let id = user_id(user);
        [
            format!(
                r#"{{"action":"push","user_id":"{id}","site_id":"{SITE}","data_type":"balance","data":{{"coins":1000}}}}"#
            ),
            format!(
                r#"{{"action":"push","user_id":"{id}","site_id":"{SITE}","data_type":"profile","data":{{"display_name":"Bench user {user}"}}}}"#
            ),
        ]
        .map(|body| {
            post(Request::builder())
                .header(HOST, self.host.clone())
                .header(ORIGIN, HeaderValue::from_static(ORIGIN_URL))
                .header(AUTHORIZATION, self.tokens[user].clone())
                .body(Full::new(Bytes::from(body)))
                .expect("a seeding request is well formed")
        })
    }
}

fn post(builder: hyper::http::request::Builder) -> hyper::http::request::Builder {
    builder
        .method(Method::POST)
        .uri("/api/sync.php")
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
}
