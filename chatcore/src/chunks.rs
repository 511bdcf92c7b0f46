//! Cutting a batch into consecutive parts bounded in bytes (a `_bulk` request, an announcement of
//! changes), so that one batch of the largest messages never makes one oversized request.

/// `items` cut into consecutive, ordered chunks whose `bytes_of` add up to at most `limit`; an item
/// larger than `limit` makes a chunk of its own.
pub(crate) fn bounded_by_bytes<T>(
    items: &[T],
    limit: usize,
    bytes_of: impl Fn(&T) -> usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let fitting = rest
            .iter()
            .take_while(|item| {
                bytes += bytes_of(item);
                bytes <= limit
            })
            .count()
            .max(1);
        let (chunk, after) = rest.split_at(fitting);
        rest = after;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_the_order_and_stay_under_the_limit() {
        let sizes = [3, 4, 2, 9, 1, 1];
        let chunks: Vec<&[usize]> = bounded_by_bytes(&sizes, 7, |&size| size).collect();
        assert_eq!(chunks, [&[3, 4][..], &[2], &[9], &[1, 1]]);
        assert_eq!(
            bounded_by_bytes(&[] as &[usize], 7, |&size| size).count(),
            0
        );
    }
}
