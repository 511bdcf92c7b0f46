//! The numbers this process handed out lately, per scope. A counter hands every number out once
//! and only ever goes up (a reseed starts above every reservation, a raise only raises), so a
//! number handed out again means the counter went back in time where no epoch or server check
//! can see it: a key-level restore or a migration tool rolled its hash back in place.

use std::collections::HashMap;
use std::sync::Mutex;

use super::Scope;

/// How far below the highest number a number may arrive and still be told apart as new: requests
/// of one scope in flight at once get their numbers in one order and may reach this check in
/// another. Anything further below counts as handed out (a false alarm costs one skipped number).
const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;
const STRIPES: usize = 64;
/// Scopes remembered per stripe; a full stripe forgets them all (it then only misses a rollback
/// of those scopes until they hand out numbers again, which the ingest-worker still catches).
const SCOPES_PER_STRIPE: usize = 256;

pub(super) struct HandedOut {
    stripes: Box<[Mutex<HashMap<Scope, Recent>>]>,
}

/// The highest number of a scope and which of the [`WINDOW`] numbers up to it were handed out:
/// bit `i` stands for `highest - i`.
struct Recent {
    highest: u64,
    seen: [u64; WORDS],
}

impl Recent {
    fn new(number: u64) -> Self {
        let mut seen = [0; WORDS];
        seen[0] = 1;
        Self {
            highest: number,
            seen,
        }
    }

    /// Records `number`; `Err(highest)` when it was handed out already (or is too far below to
    /// tell).
    fn record(&mut self, number: u64) -> Result<(), u64> {
        if number > self.highest {
            self.shift(number - self.highest);
            self.highest = number;
            self.seen[0] |= 1;
            return Ok(());
        }
        let below = self.highest - number;
        if below >= WINDOW {
            return Err(self.highest);
        }
        let (word, bit) = ((below / 64) as usize, below % 64);
        if self.seen[word] & (1 << bit) != 0 {
            return Err(self.highest);
        }
        self.seen[word] |= 1 << bit;
        Ok(())
    }

    /// Moves every bit `by` places up (the numbers they stand for stay, the highest rises).
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for index in (0..WORDS).rev() {
            self.seen[index] = match index.checked_sub(words) {
                None => 0,
                Some(source) if bits == 0 => self.seen[source],
                Some(0) => self.seen[0] << bits,
                Some(source) => self.seen[source] << bits | self.seen[source - 1] >> (64 - bits),
            };
        }
    }
}

impl HandedOut {
    pub(super) fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Records a number the counter just handed out in `scope`; `Err(highest)` (the highest this
    /// process handed out there) when the counter handed it out before.
    pub(super) fn record(&self, scope: &Scope, number: u64) -> Result<(), u64> {
        let stripe = scope.stripe(STRIPES);
        // A panic elsewhere cannot leave a `Recent` half-changed: recover the map.
        let mut scopes = self.stripes[stripe]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(recent) = scopes.get_mut(scope) {
            return recent.record(number);
        }
        if scopes.len() >= SCOPES_PER_STRIPE {
            scopes.clear();
        }
        scopes.insert(*scope, Recent::new(number));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Number;

    fn scope(chat: u64) -> Scope {
        Scope::MessagesOf {
            application_id: 1,
            chat_number: Number::new(chat).expect("positive"),
        }
    }

    #[test]
    fn numbers_arriving_out_of_order_are_new_and_a_number_seen_again_is_not() {
        let handed_out = HandedOut::new();
        for number in [5, 3, 4, 1, 2, 70, 6, 200, 69, 1000, 7] {
            assert_eq!(handed_out.record(&scope(1), number), Ok(()), "{number}");
        }
        for number in [5, 3, 70, 200, 1000, 7] {
            assert_eq!(handed_out.record(&scope(1), number), Err(1000), "{number}");
        }
        // Below the window: taken as handed out, whatever it was.
        assert_eq!(handed_out.record(&scope(1), 8), Ok(()));
        assert_eq!(handed_out.record(&scope(1), 2000), Ok(()));
        assert_eq!(handed_out.record(&scope(1), 9), Err(2000));
        assert_eq!(handed_out.record(&scope(1), 1000 + 64), Ok(()));
        assert_eq!(handed_out.record(&scope(1), 1000), Err(2000));
        // Scopes are apart.
        assert_eq!(handed_out.record(&scope(2), 5), Ok(()));
    }

    #[test]
    fn shifts_keep_every_bit_across_words() {
        let mut recent = Recent::new(1);
        let numbers: Vec<u64> = (9..=900).step_by(7).collect();
        for &number in &numbers {
            recent.record(number).expect("new");
            recent.record(number - 1).expect("new, below the highest");
        }
        for &number in &numbers {
            assert_eq!(recent.record(number), Err(recent.highest), "{number}");
            assert_eq!(
                recent.record(number - 1),
                Err(recent.highest),
                "{}",
                number - 1
            );
        }
        assert_eq!(recent.record(numbers[3] + 2), Ok(()));
    }

    #[test]
    fn a_full_stripe_forgets_its_scopes() {
        let handed_out = HandedOut::new();
        for chat in 1..=(STRIPES * SCOPES_PER_STRIPE * 2) as u64 {
            assert_eq!(handed_out.record(&scope(chat), 10), Ok(()));
        }
        let remembered: usize = handed_out
            .stripes
            .iter()
            .map(|stripe| stripe.lock().expect("not poisoned").len())
            .sum();
        assert!(remembered <= STRIPES * SCOPES_PER_STRIPE, "{remembered}");
    }
}
