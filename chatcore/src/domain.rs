//! Domain types that parse their input once; holding one means the value is valid.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, SecondsFormat, SubsecRound as _, Utc};
use rand::Rng as _;
use serde::{Deserialize, Serialize, Serializer};

/// Words of a query beyond this many are ignored, which bounds the cost of one search (and the
/// rank a relevance cursor can name).
pub const MAX_QUERY_WORDS: usize = 16;

/// Why a value was refused; `field` names the JSON field or parameter that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub message: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// An application's key. New tokens are `chat_`, 30 random base62 characters (178 bits) and 6 of
/// the CRC32 of those, so that secret scanners recognise them by the prefix and confirm them by the
/// checksum without asking us; tokens made before that format (32 URL-safe base64 characters,
/// 192 random bits) keep working. The database holds only [`TokenDigest`]s.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ApplicationToken(String);

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

impl ApplicationToken {
    pub const PREFIX: &str = "chat_";
    const RANDOM_CHARS: usize = 30;
    const CHECKSUM_CHARS: usize = 6;
    pub const LENGTH: usize = Self::PREFIX.len() + Self::RANDOM_CHARS + Self::CHECKSUM_CHARS;
    /// The length of a token of the first format.
    const LEGACY_LENGTH: usize = 32;

    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let random: String = (0..Self::RANDOM_CHARS)
            .map(|_| char::from(BASE62[rng.random_range(0..BASE62.len())]))
            .collect();
        let checksum = Self::checksum(&random);
        Self(format!("{}{random}{checksum}", Self::PREFIX))
    }

    /// The CRC32 of the random part, as 6 base62 digits.
    fn checksum(random: &str) -> String {
        let mut value = u64::from(crc32fast::hash(random.as_bytes()));
        let mut digits = [b'0'; Self::CHECKSUM_CHARS];
        for digit in digits.iter_mut().rev() {
            *digit = BASE62[(value % 62) as usize];
            value /= 62;
        }
        digits.iter().copied().map(char::from).collect()
    }

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let invalid = || InvalidInput::new("token", "is not an application token");
        if let Some(rest) = raw.strip_prefix(Self::PREFIX) {
            if raw.len() != Self::LENGTH || !rest.bytes().all(|byte| byte.is_ascii_alphanumeric()) {
                return Err(invalid());
            }
            let (random, checksum) = rest.split_at(Self::RANDOM_CHARS);
            if Self::checksum(random) != checksum {
                return Err(invalid());
            }
            return Ok(Self(raw.to_owned()));
        }
        let legacy = raw.len() == Self::LEGACY_LENGTH
            && raw
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
        if !legacy {
            return Err(invalid());
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the database keeps of the token.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest(<sha2::Sha256 as sha2::Digest>::digest(self.0.as_bytes()).into())
    }

    /// What an operator is shown of the token: its prefix and last 4 characters.
    pub fn hint(&self) -> String {
        let prefix = if self.0.starts_with(Self::PREFIX) {
            Self::PREFIX
        } else {
            ""
        };
        format!("{prefix}...{}", &self.0[self.0.len() - 4..])
    }
}

/// Never printed whole: a token in a log line or an error is a leaked key.
impl fmt::Debug for ApplicationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApplicationToken({})", self.hint())
    }
}

impl fmt::Display for ApplicationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SHA-256 of an application token: what the database stores and is searched by. The token
/// has 178 random bits or more, so a plain hash cannot be reversed by guessing (no salt needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The id of an application's client-token key: 128 random bits, URL-safe base64. Only the id is
/// stored; the key is HMAC-SHA256(operator secret, id), so a database dump cannot sign a token.
/// A new id (revoke-all) ends every client token signed under the old one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKeyId(String);

impl ClientKeyId {
    pub fn generate() -> Self {
        Self(URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>()))
    }

    /// An id as stored or as a token's header carries it (its signature is what vouches for it).
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A name or title as people type it: trimmed, 1..=`max_chars` characters, no control characters.
fn short_text(field: &'static str, raw: &str, max_chars: usize) -> Result<String, InvalidInput> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(InvalidInput::new(field, "must not be blank"));
    }
    if trimmed.chars().count() > max_chars {
        return Err(InvalidInput::new(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(InvalidInput::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(trimmed.to_owned())
}

/// An application name: 1..=255 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ApplicationName(String);

impl ApplicationName {
    pub const MAX_CHARS: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        short_text("name", raw, Self::MAX_CHARS).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message body: 1..=65,536 bytes of UTF-8, not only whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageBody(String);

impl MessageBody {
    pub const MAX_BYTES: usize = 65_536;

    pub fn parse(raw: String) -> Result<Self, InvalidInput> {
        if raw.trim().is_empty() {
            return Err(InvalidInput::new("body", "must not be blank"));
        }
        if raw.len() > Self::MAX_BYTES {
            return Err(InvalidInput::new(
                "body",
                format!("must be at most {} bytes", Self::MAX_BYTES),
            ));
        }
        if raw.contains('\0') {
            return Err(InvalidInput::new("body", "must not contain NUL characters"));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Who sent a message: an opaque id the integrator chooses, 1..=128 characters of
/// `[A-Za-z0-9._:@-]` (fits ids like `u42`, `user:42` or an e-mail address; never markup).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct Sender(String);

impl Sender {
    pub const MAX_CHARS: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let allowed = |byte: u8| byte.is_ascii_alphanumeric() || b"._:@-".contains(&byte);
        if raw.is_empty() || raw.len() > Self::MAX_CHARS || !raw.bytes().all(allowed) {
            return Err(InvalidInput::new(
                "sender",
                format!(
                    "must be 1 to {} characters of A-Z, a-z, 0-9, '.', '_', ':', '@' and '-'",
                    Self::MAX_CHARS
                ),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An integrator's own data on a chat or message: a JSON object of at most 32 keys and 4 KiB
/// serialized. Kept as its compact serialization, which is what is stored and sent on.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::Type)]
#[sqlx(transparent)]
pub struct Metadata(String);

impl Metadata {
    pub const MAX_BYTES: usize = 4_096;
    pub const MAX_KEYS: usize = 32;

    pub fn parse(value: &serde_json::Value) -> Result<Self, InvalidInput> {
        let Some(object) = value.as_object() else {
            return Err(InvalidInput::new("metadata", "must be a JSON object"));
        };
        if object.len() > Self::MAX_KEYS {
            return Err(InvalidInput::new(
                "metadata",
                format!("must have at most {} keys", Self::MAX_KEYS),
            ));
        }
        let serialized = value.to_string();
        if serialized.len() > Self::MAX_BYTES {
            return Err(InvalidInput::new(
                "metadata",
                format!("must be at most {} bytes serialized", Self::MAX_BYTES),
            ));
        }
        Ok(Self(serialized))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Self::parse(&value).map_err(serde::de::Error::custom)
    }
}

/// A chat's title: 1..=255 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::Type)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct ChatTitle(String);

impl ChatTitle {
    pub const MAX_CHARS: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        short_text("title", raw, Self::MAX_CHARS).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A chat or message number: a positive integer, unique within its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Number(u64);

impl Number {
    /// Numbers are stored in signed 64-bit columns.
    pub const MAX: u64 = i64::MAX as u64;

    pub fn new(value: u64) -> Option<Self> {
        (1..=Self::MAX).contains(&value).then_some(Self(value))
    }

    pub fn parse(field: &'static str, raw: &str) -> Result<Self, InvalidInput> {
        raw.parse::<u64>()
            .ok()
            .and_then(Self::new)
            .ok_or_else(|| InvalidInput::new(field, "must be a positive integer"))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn as_i64(self) -> i64 {
        // In range by construction (<= i64::MAX).
        self.0 as i64
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A search query: 1..=256 characters after trimming. Any characters are allowed; the search
/// adapter treats the text as words, never as query syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery(String);

impl SearchQuery {
    pub const MAX_CHARS: usize = 256;

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(InvalidInput::new("query", "must not be blank"));
        }
        if trimmed.chars().count() > Self::MAX_CHARS {
            return Err(InvalidInput::new(
                "query",
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where a page starts: a page number (the reference's `page`, only as deep as
/// [`PageRequest::MAX_PAGE_DEPTH`] rows) or a key (`after`/`before` a number), whose cost does
/// not depend on how deep the page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePosition {
    Page(u32),
    /// The rows whose key is greater, ascending.
    After(u64),
    /// The rows whose key is smaller: the page right before, fetched descending.
    Before(u64),
    /// The search hits ranked after this one.
    AfterHit(SearchCursor),
}

/// The order of search hits: by relevance (the hits with the most query words whole first, the
/// newest first among equals), or by number, the newest (highest) or the oldest (lowest) first.
// The schema documents the api's `?sort=`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum SearchSort {
    #[default]
    Relevance,
    Newest,
    Oldest,
}

impl SearchSort {
    /// `?sort=`: absent means relevance.
    pub fn parse(raw: Option<&str>) -> Result<Self, InvalidInput> {
        match raw {
            None | Some("relevance") => Ok(Self::Relevance),
            Some("newest") => Ok(Self::Newest),
            Some("oldest") => Ok(Self::Oldest),
            Some(_) => Err(InvalidInput::new(
                "sort",
                "must be relevance, newest or oldest",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relevance => "relevance",
            Self::Newest => "newest",
            Self::Oldest => "oldest",
        }
    }
}

/// Where the next page of a search starts: the last hit of a page (its rank and number) in the
/// order of its sort, handed to the client as an opaque string. The sort is part of it: the same
/// place means another hit in another order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchCursor {
    pub sort: SearchSort,
    /// How many query words the hit has whole ([`crate::search::QueryTerms::ranking_words`]);
    /// 0 sorted by number.
    pub rank: u32,
    pub number: u64,
}

impl SearchCursor {
    /// After the hit of `rank` and `number` in `sort` order (the rank counts for relevance only).
    pub fn new(sort: SearchSort, rank: u32, number: u64) -> Self {
        let rank = if sort == SearchSort::Relevance {
            rank
        } else {
            0
        };
        Self { sort, rank, number }
    }

    pub fn encode(self) -> String {
        let text = match self.sort {
            SearchSort::Relevance => format!("relevance:{}:{}", self.rank, self.number),
            sort => format!("{}:{}", sort.as_str(), self.number),
        };
        URL_SAFE_NO_PAD.encode(text)
    }

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let invalid = || InvalidInput::new("cursor", "is not a cursor this api handed out");
        let decoded = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
        let text = String::from_utf8(decoded).map_err(|_| invalid())?;
        let (position, rest) = text.split_once(':').ok_or_else(invalid)?;
        let (sort, rank, number) = match position {
            "newest" => (SearchSort::Newest, "0", rest),
            "oldest" => (SearchSort::Oldest, "0", rest),
            "relevance" => {
                let (rank, number) = rest.split_once(':').ok_or_else(invalid)?;
                (SearchSort::Relevance, rank, number)
            }
            // Untagged: a relevance score, as cursors were before relevance was ranks; its place
            // in the order of ranks is unknown.
            score if score.parse::<f64>().is_ok() => {
                return Err(InvalidInput::new(
                    "cursor",
                    "was handed out for the relevance order of an earlier release; search again from the first page",
                ));
            }
            _ => return Err(invalid()),
        };
        let rank: u32 = rank.parse().map_err(|_| invalid())?;
        let number: u64 = number.parse().map_err(|_| invalid())?;
        if number > Number::MAX || rank as usize > MAX_QUERY_WORDS {
            return Err(invalid());
        }
        Ok(Self::new(sort, rank, number))
    }
}

/// When a searched message was created: from `after` (included) to `before` (excluded), each
/// bound optional. Bounds count to the millisecond, as `created_at` is kept: a finer bound would
/// compare differently on each index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreatedRange {
    pub after: Option<DateTime<Utc>>,
    pub before: Option<DateTime<Utc>>,
}

impl CreatedRange {
    pub fn parse(after: Option<&str>, before: Option<&str>) -> Result<Self, InvalidInput> {
        let after = after.map(|raw| instant("created_after", raw)).transpose()?;
        let before = before
            .map(|raw| instant("created_before", raw))
            .transpose()?;
        if let (Some(after), Some(before)) = (after, before)
            && before <= after
        {
            return Err(InvalidInput::new(
                "created_before",
                "must be later than created_after",
            ));
        }
        Ok(Self { after, before })
    }
}

/// An RFC 3339 timestamp (any offset), truncated to the millisecond.
fn instant(field: &'static str, raw: &str) -> Result<DateTime<Utc>, InvalidInput> {
    DateTime::parse_from_rfc3339(raw)
        .map(|at| at.with_timezone(&Utc).trunc_subsecs(3))
        .map_err(|_| {
            InvalidInput::new(
                field,
                "must be an RFC 3339 timestamp, e.g. 2025-11-15T09:30:00Z",
            )
        })
}

/// Which messages of the chat a search considers, beside the words: every condition given must
/// hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SearchFilter {
    /// Only the messages of this sender (exactly).
    pub sender: Option<Sender>,
    pub created: CreatedRange,
}

/// What a search asks for: the words, which messages, in which order, which page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRequest {
    pub query: SearchQuery,
    pub filter: SearchFilter,
    pub sort: SearchSort,
    pub page: PageRequest,
}

/// The raw query parameters of a search.
#[derive(Debug, Clone, Copy, Default)]
pub struct SearchInput<'a> {
    pub query: Option<&'a str>,
    pub sender: Option<&'a str>,
    pub created_after: Option<&'a str>,
    pub created_before: Option<&'a str>,
    pub sort: Option<&'a str>,
    pub page: PageInput<'a>,
}

impl SearchRequest {
    /// The deepest hit a page number reaches: Elasticsearch's default `index.max_result_window`
    /// (a cursor reaches any depth).
    pub const MAX_RESULT_WINDOW: u64 = 10_000;

    pub fn parse(
        input: SearchInput<'_>,
        default_per_page: u32,
        max_per_page: u32,
    ) -> Result<Self, InvalidInput> {
        let query = input
            .query
            .ok_or_else(|| InvalidInput::new("query", "is required"))
            .and_then(SearchQuery::parse)?;
        let filter = SearchFilter {
            sender: input.sender.map(Sender::parse).transpose()?,
            created: CreatedRange::parse(input.created_after, input.created_before)?,
        };
        let sort = SearchSort::parse(input.sort)?;
        let page = PageRequest::parse(input.page, default_per_page, max_per_page)?;
        if let PagePosition::AfterHit(cursor) = page.position
            && cursor.sort != sort
        {
            return Err(InvalidInput::new(
                "cursor",
                format!(
                    "was handed out for sort={}; continue with that sort",
                    cursor.sort.as_str()
                ),
            ));
        }
        let window = Self::MAX_RESULT_WINDOW;
        if page.offset() + page.fetch_limit() > window {
            return Err(InvalidInput::new(
                "page",
                format!("search results are available up to result {window}"),
            ));
        }
        Ok(Self {
            query,
            filter,
            sort,
            page,
        })
    }
}

/// A place in an application's feed of changes, handed to the client as an opaque string (the
/// feed's order is the service's own business).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedCursor(pub u64);

impl FeedCursor {
    const PREFIX: &'static str = "feed:";

    pub fn encode(self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}{}", Self::PREFIX, self.0))
    }

    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let invalid = || InvalidInput::new("cursor", "is not a cursor this api handed out");
        let decoded = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
        let text = String::from_utf8(decoded).map_err(|_| invalid())?;
        let position = text.strip_prefix(Self::PREFIX).ok_or_else(invalid)?;
        let position: u64 = position.parse().map_err(|_| invalid())?;
        if position >= i64::MAX as u64 {
            return Err(invalid());
        }
        Ok(Self(position))
    }
}

/// One page of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub per_page: u32,
    pub position: PagePosition,
}

impl PageRequest {
    /// The deepest row a page number reaches: an `OFFSET` costs as many rows as it skips, so
    /// deeper pages are reached with `after`.
    pub const MAX_PAGE_DEPTH: u64 = 1_000;

    pub fn parse(
        input: PageInput<'_>,
        default_per_page: u32,
        max_per_page: u32,
    ) -> Result<Self, InvalidInput> {
        let per_page = match input.per_page {
            None => default_per_page,
            Some(raw) => raw
                .parse::<u32>()
                .ok()
                .filter(|size| (1..=max_per_page).contains(size))
                .ok_or_else(|| {
                    InvalidInput::new(
                        "per_page",
                        format!("must be an integer from 1 to {max_per_page}"),
                    )
                })?,
        };
        let key = |field: &'static str, raw: &str| {
            raw.parse::<u64>()
                .ok()
                .filter(|key| *key < Number::MAX)
                .ok_or_else(|| {
                    InvalidInput::new(
                        field,
                        format!("must be an integer from 0 to {}", Number::MAX - 1),
                    )
                })
        };
        if let Some(raw) = input.cursor {
            if input.page.is_some() {
                return Err(InvalidInput::new("cursor", "cannot be combined with page"));
            }
            return Ok(Self {
                per_page,
                position: PagePosition::AfterHit(SearchCursor::parse(raw)?),
            });
        }
        let position = match (input.page, input.after, input.before) {
            (None, None, None) => PagePosition::Page(1),
            (Some(raw), None, None) => {
                let deepest = Self::MAX_PAGE_DEPTH / u64::from(per_page);
                let page = raw
                    .parse::<u32>()
                    .ok()
                    .filter(|page| *page >= 1 && u64::from(*page) <= deepest.max(1))
                    .ok_or_else(|| {
                        InvalidInput::new(
                            "page",
                            format!(
                                "must be an integer from 1 to {} at this per_page; continue deeper with after=<the last number>",
                                deepest.max(1)
                            ),
                        )
                    })?;
                PagePosition::Page(page)
            }
            (None, Some(raw), None) => PagePosition::After(key("after", raw)?),
            (None, None, Some(raw)) => PagePosition::Before(key("before", raw)?),
            _ => {
                return Err(InvalidInput::new(
                    "page",
                    "page, after and before cannot be combined",
                ));
            }
        };
        Ok(Self { per_page, position })
    }

    /// Rows skipped before the page (0 for a keyed page).
    pub fn offset(self) -> u64 {
        match self.position {
            PagePosition::Page(page) => u64::from(page - 1) * u64::from(self.per_page),
            PagePosition::After(_) | PagePosition::Before(_) | PagePosition::AfterHit(_) => 0,
        }
    }

    /// Rows to fetch: one more than the page, to learn whether a next page exists.
    pub fn fetch_limit(self) -> u64 {
        u64::from(self.per_page) + 1
    }

    /// The lowest and highest key of the page (both included; both fit a signed column).
    pub fn key_bounds(self) -> (u64, u64) {
        match self.position {
            PagePosition::Page(_) | PagePosition::AfterHit(_) => (0, Number::MAX),
            PagePosition::After(after) => (after + 1, Number::MAX),
            PagePosition::Before(before) => (0, before.saturating_sub(1)),
        }
    }

    /// True when the rows are fetched from the highest key down (a `before` page).
    pub fn descending(self) -> bool {
        matches!(self.position, PagePosition::Before(_))
    }
}

/// The raw query parameters of a page.
#[derive(Debug, Clone, Copy, Default)]
pub struct PageInput<'a> {
    pub page: Option<&'a str>,
    pub per_page: Option<&'a str>,
    pub after: Option<&'a str>,
    pub before: Option<&'a str>,
    /// The `next_cursor` of a search page.
    pub cursor: Option<&'a str>,
}

/// Timestamps as the reference shows them: RFC 3339, UTC, milliseconds, `Z`.
pub fn serialize_timestamp<S: Serializer>(
    at: &DateTime<Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// An optional timestamp as [`serialize_timestamp`] writes one, or null.
pub fn serialize_optional_timestamp<S: Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => serialize_timestamp(at, serializer),
        None => serializer.serialize_none(),
    }
}

/// The parent whose children are numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    ChatsOf {
        application_id: u64,
    },
    MessagesOf {
        application_id: u64,
        chat_number: Number,
    },
}

impl Scope {
    /// Stable identifier, used as the reservation row key and in the counter key.
    pub fn id(&self) -> String {
        match self {
            Self::ChatsOf { application_id } => format!("chats:{application_id}"),
            Self::MessagesOf {
                application_id,
                chat_number,
            } => format!("messages:{application_id}:{chat_number}"),
        }
    }

    /// Which of `stripes` shards of a per-scope table (locks, memories) this scope falls in.
    pub fn stripe(&self, stripes: usize) -> usize {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(self, &mut hasher);
        std::hash::Hasher::finish(&hasher) as usize % stripes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_url_safe_and_parse_back() {
        let first = ApplicationToken::generate();
        let second = ApplicationToken::generate();
        assert_ne!(first, second);
        assert_eq!(first.as_str().len(), ApplicationToken::LENGTH);
        assert_eq!(ApplicationToken::parse(first.as_str()), Ok(first));
        assert!(ApplicationToken::parse("short").is_err());
        assert!(ApplicationToken::parse(&"+".repeat(32)).is_err());
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(
            ApplicationName::parse("  app ").map(|n| n.0),
            Ok("app".to_owned())
        );
        assert!(ApplicationName::parse("   ").is_err());
        assert!(ApplicationName::parse(&"é".repeat(255)).is_ok());
        assert!(ApplicationName::parse(&"é".repeat(256)).is_err());
        assert!(ApplicationName::parse("a\u{7}b").is_err());
    }

    #[test]
    fn bodies_are_bounded_in_bytes() {
        assert!(MessageBody::parse("hi".into()).is_ok());
        assert!(MessageBody::parse(" \n".into()).is_err());
        assert!(MessageBody::parse("a".repeat(MessageBody::MAX_BYTES)).is_ok());
        assert!(MessageBody::parse("a".repeat(MessageBody::MAX_BYTES + 1)).is_err());
        assert!(MessageBody::parse("a\0b".into()).is_err());
    }

    #[test]
    fn senders_are_opaque_ids_of_a_safe_alphabet() {
        for valid in ["u42", "user:42", "a.b_c-d@example.com", &"x".repeat(128)] {
            assert_eq!(Sender::parse(valid).map(|s| s.0), Ok(valid.to_owned()));
        }
        for invalid in ["", "has space", "<b>", "é", &"x".repeat(129)] {
            assert!(Sender::parse(invalid).is_err(), "{invalid}");
        }
    }

    #[test]
    fn metadata_is_a_bounded_object() {
        let parsed = Metadata::parse(&serde_json::json!({"a": 1, "b": [true]})).expect("valid");
        assert_eq!(parsed.as_str(), r#"{"a":1,"b":[true]}"#);
        assert_eq!(parsed.to_value(), serde_json::json!({"a": 1, "b": [true]}));
        assert!(Metadata::parse(&serde_json::json!([1])).is_err());
        assert!(Metadata::parse(&serde_json::json!("text")).is_err());
        let keys: serde_json::Map<_, _> = (0..33)
            .map(|key| (key.to_string(), serde_json::Value::Null))
            .collect();
        assert!(Metadata::parse(&serde_json::Value::Object(keys)).is_err());
        let big = serde_json::json!({"k": "x".repeat(Metadata::MAX_BYTES)});
        assert!(Metadata::parse(&big).is_err());
        let fits = serde_json::json!({"k": "x".repeat(Metadata::MAX_BYTES - 8)});
        assert!(Metadata::parse(&fits).is_ok());
    }

    #[test]
    fn titles_are_trimmed_and_bounded() {
        assert_eq!(
            ChatTitle::parse(" Team ").map(|t| t.0),
            Ok("Team".to_owned())
        );
        assert!(ChatTitle::parse("  ").is_err());
        assert!(ChatTitle::parse(&"é".repeat(256)).is_err());
    }

    #[test]
    fn numbers_are_positive_and_fit_a_signed_column() {
        assert_eq!(Number::parse("number", "7").map(Number::get), Ok(7));
        assert!(Number::parse("number", "0").is_err());
        assert!(Number::parse("number", "-1").is_err());
        assert!(Number::parse("number", "abc").is_err());
        assert!(Number::parse("number", &(Number::MAX + 1).to_string()).is_err());
    }

    fn page(page: Option<&str>, per_page: Option<&str>) -> Result<PageRequest, InvalidInput> {
        PageRequest::parse(
            PageInput {
                page,
                per_page,
                ..PageInput::default()
            },
            25,
            100,
        )
    }

    #[test]
    fn pages_default_and_are_bounded() {
        let default = page(None, None).expect("defaults");
        assert_eq!(
            (default.position, default.per_page, default.offset()),
            (PagePosition::Page(1), 25, 0)
        );
        let third = page(Some("3"), Some("10")).expect("valid");
        assert_eq!((third.offset(), third.fetch_limit()), (20, 11));
        assert!(page(Some("0"), None).is_err());
        assert!(page(None, Some("101")).is_err());
        assert!(page(Some("x"), None).is_err());
        assert!(page(Some("10"), Some("100")).is_ok(), "row 1,000");
        assert!(page(Some("11"), Some("100")).is_err(), "deeper: use after");
        assert!(page(Some("1000"), Some("1")).is_ok());
    }

    #[test]
    fn keyed_pages_cost_no_offset() {
        let after = PageRequest::parse(
            PageInput {
                after: Some("999900"),
                ..PageInput::default()
            },
            25,
            100,
        )
        .expect("valid");
        assert_eq!(after.offset(), 0);
        assert_eq!(after.key_bounds(), (999_901, Number::MAX));
        assert!(!after.descending());
        let before = PageRequest::parse(
            PageInput {
                before: Some("26"),
                ..PageInput::default()
            },
            25,
            100,
        )
        .expect("valid");
        assert_eq!(before.key_bounds(), (0, 25));
        assert!(before.descending());
        let both = PageInput {
            page: Some("2"),
            after: Some("3"),
            ..PageInput::default()
        };
        assert!(PageRequest::parse(both, 25, 100).is_err());
    }

    #[test]
    fn search_cursors_round_trip_and_reject_forgeries() {
        let cursor = SearchCursor::new(SearchSort::Relevance, 3, 42);
        assert_eq!(SearchCursor::parse(&cursor.encode()), Ok(cursor));
        for sort in [SearchSort::Newest, SearchSort::Oldest] {
            let cursor = SearchCursor::new(sort, 3, 7);
            assert_eq!(SearchCursor::parse(&cursor.encode()), Ok(cursor));
            assert_eq!((cursor.sort, cursor.rank), (sort, 0));
        }
        let forged = ["", "!!", "bm90IGEgY3Vyc29y", "TmFOOjE", "bmV3ZXN0Ong"];
        // `relevance:17:1` (more ranks than query words), `relevance:-1:1`, `relevance:1`.
        let impossible = [
            "cmVsZXZhbmNlOjE3OjE",
            "cmVsZXZhbmNlOi0xOjE",
            "cmVsZXZhbmNlOjE",
        ];
        for forged in forged.iter().chain(&impossible) {
            assert!(SearchCursor::parse(forged).is_err(), "{forged}");
        }
    }

    #[test]
    fn relevance_cursors_of_the_order_by_score_are_refused_with_a_way_on() {
        // `1.5:42`: a cursor of the releases that ranked by score.
        let refused = SearchCursor::parse("MS41OjQy").expect_err("a position in another order");
        assert_eq!(refused.field, "cursor");
        assert!(refused.message.contains("search again"), "{refused:?}");
    }

    fn search_request(input: SearchInput<'_>) -> Result<SearchRequest, InvalidInput> {
        SearchRequest::parse(
            SearchInput {
                query: input.query.or(Some("hello")),
                ..input
            },
            25,
            100,
        )
    }

    #[test]
    fn search_requests_parse_filters_and_sorts_at_the_edge() {
        let request = search_request(SearchInput {
            sender: Some("user:42"),
            created_after: Some("2025-11-15T10:00:00.123456+01:00"),
            created_before: Some("2025-11-16T00:00:00Z"),
            sort: Some("newest"),
            ..SearchInput::default()
        })
        .expect("valid");
        assert_eq!(request.sort, SearchSort::Newest);
        assert_eq!(
            request.filter.sender.as_ref().map(Sender::as_str),
            Some("user:42")
        );
        let after = request.filter.created.after.expect("after");
        assert_eq!(
            after.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            "2025-11-15T09:00:00.123Z",
            "in UTC, to the millisecond"
        );
        let defaults = search_request(SearchInput::default()).expect("valid");
        assert_eq!(
            (defaults.sort, defaults.filter),
            (SearchSort::Relevance, SearchFilter::default())
        );
        let refused = |input: SearchInput<'_>| search_request(input).map(|_| ()).unwrap_err().field;
        for (input, field) in [
            (
                SearchInput {
                    sender: Some("not valid"),
                    ..SearchInput::default()
                },
                "sender",
            ),
            (
                SearchInput {
                    created_after: Some("yesterday"),
                    ..SearchInput::default()
                },
                "created_after",
            ),
            (
                SearchInput {
                    created_before: Some("2025-11-15"),
                    ..SearchInput::default()
                },
                "created_before",
            ),
            (
                SearchInput {
                    created_after: Some("2025-11-15T00:00:00Z"),
                    created_before: Some("2025-11-15T00:00:00Z"),
                    ..SearchInput::default()
                },
                "created_before",
            ),
            (
                SearchInput {
                    sort: Some("random"),
                    ..SearchInput::default()
                },
                "sort",
            ),
        ] {
            assert_eq!(refused(input), field);
        }
    }

    #[test]
    fn a_cursor_continues_only_the_sort_it_was_made_for() {
        let newest = SearchCursor::new(SearchSort::Newest, 0, 9).encode();
        let with_cursor = |sort| SearchInput {
            sort,
            page: PageInput {
                cursor: Some(&newest),
                ..PageInput::default()
            },
            ..SearchInput::default()
        };
        let continued = search_request(with_cursor(Some("newest"))).expect("same sort");
        assert!(matches!(
            continued.page.position,
            PagePosition::AfterHit(SearchCursor { number: 9, .. })
        ));
        for other in [None, Some("relevance"), Some("oldest")] {
            let refused = search_request(with_cursor(other)).expect_err("another sort");
            assert_eq!(refused.field, "cursor");
        }
    }

    #[test]
    fn timestamps_serialize_like_the_reference() {
        let at = DateTime::parse_from_rfc3339("2025-11-15T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc);
        let mut out = Vec::new();
        serialize_timestamp(&at, &mut serde_json::Serializer::new(&mut out)).expect("serializes");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "\"2025-11-15T00:00:00.000Z\""
        );
    }
}
