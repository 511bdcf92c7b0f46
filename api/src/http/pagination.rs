//! The page parameters of every list, and the pagination object of its answer.

use chatcore::domain::{PageInput, PagePosition, PageRequest, SearchCursor};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::http::error::ApiError;
use crate::http::state::AppState;

/// `?page=&per_page=&after=&before=` of every list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page, 1-based (default 1), only as deep as row 1,000 (`page * per_page`); continue with
    /// `after`. Cannot be combined with `after` or `before`.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    page: Option<String>,
    /// Page size (default 25, at most 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    per_page: Option<String>,
    /// The page after this key (a number; for applications the `next_after` of a page): its
    /// cost does not depend on how deep the page is.
    #[param(value_type = Option<u64>, minimum = 0)]
    after: Option<String>,
    /// The page right before this key.
    #[param(value_type = Option<u64>, minimum = 0)]
    before: Option<String>,
}

impl PageParams {
    pub fn parse(&self, state: &AppState) -> Result<PageRequest, ApiError> {
        let api = state.settings();
        PageRequest::parse(
            PageInput {
                page: self.page.as_deref(),
                per_page: self.per_page.as_deref(),
                after: self.after.as_deref(),
                before: self.before.as_deref(),
                cursor: None,
            },
            api.default_page_size,
            api.max_page_size,
        )
        .map_err(ApiError::bad_parameter)
    }
}

/// Pagination block of every list response: where the neighbouring pages start. Pass
/// `next_after` as `after` for the next page, `previous_before` as `before` for the previous one,
/// and in a search `next_cursor` as `cursor`; walking `next_after` (or `next_cursor`) returns every
/// item exactly once.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pagination {
    /// The page number, for a `page` request.
    #[serde(skip_serializing_if = "Option::is_none")]
    page: Option<u32>,
    /// The page size used (the `per_page` asked for, or the default).
    per_page: u32,
    /// The next page number, while it is within the page-number depth; null otherwise.
    next_page: Option<u32>,
    /// `after` of the next page; null on the last page.
    next_after: Option<u64>,
    /// `before` of the previous page; null on the first page.
    previous_before: Option<u64>,
    /// Search only: `cursor` of the next page (opaque); null on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<Option<String>>,
}

/// Cuts the extra row fetched to detect more rows, puts a `before` page back in ascending order,
/// and tells where the neighbouring pages start (`key` is the key the list is ordered by).
pub fn paginate<T>(
    mut rows: Vec<T>,
    page: PageRequest,
    key: impl Fn(&T) -> u64,
) -> (Vec<T>, Pagination) {
    let has_more = rows.len() > page.per_page as usize;
    rows.truncate(page.per_page as usize);
    if page.descending() {
        rows.reverse();
    }
    let first = rows.first().map(&key);
    let last = rows.last().map(&key);
    let (next_after, previous_before) = match page.position {
        PagePosition::Page(number) => (last.filter(|_| has_more), first.filter(|_| number > 1)),
        PagePosition::After(after) => (last.filter(|_| has_more), first.filter(|_| after > 0)),
        // The key the page was asked before is itself after it.
        PagePosition::Before(_) => (last, first.filter(|_| has_more)),
        PagePosition::AfterHit(_) => (last.filter(|_| has_more), None),
    };
    let (page_number, next_page) = match page.position {
        PagePosition::Page(number) => {
            let next = number + 1;
            let within = u64::from(next) * u64::from(page.per_page) <= PageRequest::MAX_PAGE_DEPTH;
            (Some(number), (has_more && within).then_some(next))
        }
        PagePosition::After(_) | PagePosition::Before(_) | PagePosition::AfterHit(_) => {
            (None, None)
        }
    };
    let pagination = Pagination {
        page: page_number,
        per_page: page.per_page,
        next_page,
        next_after,
        previous_before,
        next_cursor: None,
    };
    (rows, pagination)
}

impl Pagination {
    /// Adds the cursor of the next search page: after the last hit, when there are more.
    pub fn with_next_cursor(mut self, last_hit: Option<SearchCursor>) -> Self {
        let more = self.next_after.is_some();
        self.next_cursor = Some(last_hit.filter(|_| more).map(SearchCursor::encode));
        self
    }
}
