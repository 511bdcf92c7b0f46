//! The per-application quotas that need a count shared by every replica.

use super::{AppError, ChatService};

impl ChatService {
    /// Counts a message against `CHAT_MAX_MESSAGES_PER_MINUTE_PER_APPLICATION` (when set): one
    /// count per application and wall-clock minute, shared by every replica in the counter store.
    pub(super) async fn count_message_against_quota(
        &self,
        application_id: u64,
    ) -> Result<(), AppError> {
        let quota = self.settings.max_messages_per_minute_per_application;
        if quota == 0 {
            return Ok(());
        }
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let minute = since_epoch.as_secs() / 60;
        let key = format!(
            "{}:quota:messages:{application_id}:{minute}",
            self.key_prefix
        );
        // Kept past its minute, so a replica whose clock is a little behind counts on it.
        let counted = self
            .state
            .count_in_window(&key, std::time::Duration::from_secs(120))
            .await?;
        if counted <= quota {
            return Ok(());
        }
        let next_minute = std::time::Duration::from_secs((minute + 1) * 60);
        Err(AppError::MessageQuotaExceeded {
            quota,
            retry_after: next_minute.saturating_sub(since_epoch),
        })
    }
}
