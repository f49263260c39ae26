//! Structured input drawn from fuzzer bytes: JSON values whose keys are often the
//! protocol's field names, text full of the characters the normalizer treats specially, and
//! push data shaped like each record type. Running out of bytes yields the smallest values,
//! so every input builds something.

use arbitrary::{Result, Unstructured};
use protocol::{DataType, Limits, MAX_AMOUNT, SiteId, amount_field};
use serde_json::{Map, Value};

use crate::check::PROFILE_FIELDS;

/// The site pushes come from, unless another is drawn.
pub const SITE: &str = "roflfaucet";

const NAMES: &[&str] = &[
    "action",
    "user_id",
    "site_id",
    "data_type",
    "data",
    "delta",
    "op_id",
    "reason",
    "token",
    "base_version",
    "coins",
    "points",
    "display_name",
    "bio",
    "avatar",
    "location",
    "website",
    "global_roles",
    "site_roles",
    SITE,
    "theme",
    "a",
    "b",
    "",
];

/// Whitespace of every kind, the marks the normalizer drops, control characters, characters
/// that matter in URLs and markup, and a few beyond the BMP.
const SPECIAL_CHARS: &[char] = &[
    ' ', '\t', '\r', '\n', '\u{2028}', '\u{2029}', '\u{a0}', '\u{3000}', '\u{200b}', '\u{200d}', '\u{feff}',
    '\u{200e}', '\u{200f}', '\u{061c}', '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', 'é', '👨', '🎉', 'ﷺ',
    '\0', '\u{7}', '\u{b}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}', '<', '>', '"', '\'', '`', '\\', ':', '/',
    '.', '[', ']', '?', '#',
];

/// Lengths at the text limits, in characters.
const LIMIT_LENGTHS: &[usize] =
    &[15, 16, 17, 63, 64, 65, 99, 100, 101, 199, 200, 201, 499, 500, 501, 999, 1000, 1001];

const AMOUNTS: &[i64] = &[
    0,
    1,
    -1,
    MAX_AMOUNT,
    MAX_AMOUNT + 1,
    -MAX_AMOUNT,
    -MAX_AMOUNT - 1,
    1_000_000_000,
    1_000_000_001,
    -1_000_000_000,
    -1_000_000_001,
    i64::MIN,
    i64::MAX,
];

/// Numbers JSON writes in ways no `i64`, `u64` or `f64` drawn above would.
const NUMBER_TEXTS: &[&str] = &[
    "1e300",
    "-1e300",
    "0.5",
    "10.0",
    "-0.0",
    "9007199254740991.0",
    "9007199254740992.0",
    "1e20",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "5e-324",
];

fn char(u: &mut Unstructured) -> Result<char> {
    Ok(match u.int_in_range(0..=7)? {
        0..=3 => char::from(u.int_in_range(b'a'..=b'z')?),
        4 => char::from(u.int_in_range(b' '..=b'~')?),
        5 | 6 => *u.choose(SPECIAL_CHARS)?,
        _ => u.arbitrary()?,
    })
}

/// User text: mostly short mixes of plain and special characters, sometimes one character
/// repeated to a length limit, sometimes something like a URL.
pub fn text(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=9)? {
        0 => {
            let n = *u.choose(LIMIT_LENGTHS)?;
            let c = *u.choose(&['x', 'é', '🎉', '\u{200e}', ' '])?;
            let pad = if u.arbitrary()? { " " } else { "" };
            format!("{pad}{}{pad}", String::from_iter(std::iter::repeat_n(c, n)))
        }
        1 => {
            let scheme =
                *u.choose(&["http://", "https://", "HTTPS://", "HtTp://", "javascript:", "//", ""])?;
            let host: String = (0..u.int_in_range(0..=12)?)
                .map(|_| u.choose(b"abcz09.-:[]").map(|&b| char::from(b)))
                .collect::<Result<_>>()?;
            format!("{scheme}{host}{}", short_text(u)?)
        }
        _ => short_text(u)?,
    })
}

fn short_text(u: &mut Unstructured) -> Result<String> {
    (0..u.int_in_range(0..=24)?).map(|_| char(u)).collect()
}

/// An object key: usually one of the protocol's names, so that objects collide and nest
/// where the protocol looks.
pub fn key(u: &mut Unstructured) -> Result<String> {
    if u.ratio(3, 4)? { Ok((*u.choose(NAMES)?).to_owned()) } else { text(u) }
}

pub fn number(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=5)? {
        0 => Value::from(u.arbitrary::<i64>()?),
        1 => Value::from(u.arbitrary::<u64>()?),
        2 => Value::from(u.int_in_range(-20i64..=20)?),
        3 => Value::from(*u.choose(AMOUNTS)?),
        // Not-a-number and the infinities become null, as JSON has no such numbers.
        4 => Value::from(u.arbitrary::<f64>()?),
        _ => serde_json::from_str(u.choose(NUMBER_TEXTS)?).expect("a JSON number"),
    })
}

/// Any JSON value nested at most `depth` levels.
pub fn json(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let kinds = if depth == 0 { 3 } else { 5 };
    Ok(match u.int_in_range(0..=kinds)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => number(u)?,
        3 => Value::String(text(u)?),
        4 => Value::Array((0..u.int_in_range(0..=5)?).map(|_| json(u, depth - 1)).collect::<Result<_>>()?),
        _ => Value::Object(object(u, depth - 1)?),
    })
}

/// A JSON object of up to five members nested at most `depth` levels below it.
pub fn object(u: &mut Unstructured, depth: u32) -> Result<Map<String, Value>> {
    (0..u.int_in_range(0..=5)?).map(|_| Ok((key(u)?, json(u, depth)?))).collect()
}

pub fn data_type(u: &mut Unstructured) -> Result<DataType> {
    u.choose(&DataType::ALL).copied()
}

/// A site id: usually [`SITE`], otherwise any name of the site id alphabet.
pub fn site(u: &mut Unstructured) -> Result<SiteId> {
    let id = if u.ratio(3, 4)? { SITE.to_owned() } else { name(u, 32)? };
    Ok(SiteId::parse(&id).expect("drawn from the site id alphabet"))
}

/// `[a-z0-9_-]{1,max}`.
fn name(u: &mut Unstructured, max: usize) -> Result<String> {
    (0..u.int_in_range(1..=max)?).map(|_| u.choose(b"abcdxyz0189_-").map(|&b| char::from(b))).collect()
}

pub fn limits(u: &mut Unstructured) -> Result<Limits> {
    Ok(match u.int_in_range(0..=3)? {
        0 => Limits { max_delta: u.arbitrary()? },
        1 => Limits { max_delta: u.int_in_range(-5..=5)? },
        _ => Limits::default(),
    })
}

/// The `data` of a push shaped like a record of type `t`, now and then with a wrong field,
/// a wrong type or an out-of-range value, or anything at all.
pub fn push_data(u: &mut Unstructured, t: DataType) -> Result<Value> {
    if u.ratio(1, 10)? {
        return json(u, 3);
    }
    let mut data = Map::new();
    let fields = match t {
        DataType::Balance | DataType::Points if u.ratio(7, 8)? => 1,
        _ => u.int_in_range(0..=4)?,
    };
    for _ in 0..fields {
        let (k, v) = match t {
            DataType::Balance | DataType::Points => (amount_key(u, t)?, amount(u)?),
            DataType::Profile => {
                let k = if u.ratio(7, 8)? { u.choose(&PROFILE_FIELDS)?.0.to_owned() } else { key(u)? };
                let v = match u.int_in_range(0..=9)? {
                    0 => Value::Null,
                    1 => json(u, 2)?,
                    _ => Value::String(text(u)?),
                };
                (k, v)
            }
            DataType::Settings => {
                let k = match u.int_in_range(0..=7)? {
                    0 => key(u)?,
                    1 => setting_key(u, 41)?,
                    _ => setting_key(u, 40)?,
                };
                let v = match u.int_in_range(0..=8)? {
                    0 => Value::Null,
                    1 => Value::Bool(u.arbitrary()?),
                    2 | 3 => number(u)?,
                    4 => json(u, 2)?,
                    _ => Value::String(text(u)?),
                };
                (k, v)
            }
            DataType::Roles => match u.int_in_range(0..=8)? {
                0..=2 => ("global_roles".to_owned(), role_list(u)?),
                3..=7 => ("site_roles".to_owned(), site_roles(u)?),
                _ => (key(u)?, json(u, 2)?),
            },
        };
        data.insert(k, v);
    }
    Ok(Value::Object(data))
}

/// The amount field of `t` (`coins` for a type that has none), sometimes another.
fn amount_key(u: &mut Unstructured, t: DataType) -> Result<String> {
    let own = amount_field(t).unwrap_or("coins");
    Ok(match u.int_in_range(0..=7)? {
        0 => key(u)?,
        1 => (*u.choose(&["coins", "points"])?).to_owned(),
        _ => own.to_owned(),
    })
}

fn amount(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=7)? {
        0 => json(u, 1)?,
        1..=3 => number(u)?,
        _ => Value::from(u.int_in_range(0..=MAX_AMOUNT)?),
    })
}

fn setting_key(u: &mut Unstructured, len: usize) -> Result<String> {
    (0..u.int_in_range(1..=len)?).map(|_| u.choose(b"abcxyz019_").map(|&b| char::from(b))).collect()
}

fn site_roles(u: &mut Unstructured) -> Result<Value> {
    if u.ratio(1, 8)? {
        return json(u, 2);
    }
    let mut sites = Map::new();
    for _ in 0..u.int_in_range(0..=2)? {
        let site = match u.int_in_range(0..=7)? {
            0 => key(u)?,
            1 => name(u, 8)?,
            _ => SITE.to_owned(),
        };
        sites.insert(site, role_list(u)?);
    }
    Ok(Value::Object(sites))
}

/// A list of role names, sometimes too long, with duplicates, bad names or not a list.
fn role_list(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=9)? {
        0 => Value::Null,
        1 => json(u, 2)?,
        _ => Value::Array(
            (0..u.int_in_range(0..=20)?)
                .map(|_| {
                    Ok(match u.int_in_range(0..=11)? {
                        0 => json(u, 1)?,
                        1 => Value::String(text(u)?),
                        2 => Value::String(name(u, 33)?),
                        3..=6 => Value::String(name(u, 6)?),
                        _ => Value::from(*u.choose(&["admin", "recipient", "verified", "mod", "a-b_1"])?),
                    })
                })
                .collect::<Result<_>>()?,
        ),
    })
}

/// The `delta` object of a delta request on `t`: usually one field.
pub fn delta(u: &mut Unstructured, t: DataType) -> Result<Map<String, Value>> {
    let fields = if u.ratio(7, 8)? { 1 } else { u.int_in_range(0..=3)? };
    (0..fields)
        .map(|_| {
            let v = match u.int_in_range(0..=7)? {
                0 => json(u, 1)?,
                1..=3 => number(u)?,
                _ => Value::from(u.int_in_range(-1_000_000_000i64..=1_000_000_000)?),
            };
            Ok((amount_key(u, t)?, v))
        })
        .collect()
}
