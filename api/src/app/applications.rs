//! Applications: created with their first token, renamed, read, listed for the operator, and
//! deleted by their tenant.

use chatcore::domain::{ApplicationName, ApplicationToken, PageRequest};
use chatcore::events::{Event, EventPayload, TraceContext};
use chatcore::store::ApplicationRow;

use super::{AppError, ChatService};

impl ChatService {
    /// Creates an application and its first token (shown once: the database keeps its digest).
    pub async fn create_application(
        &self,
        name: &ApplicationName,
    ) -> Result<(ApplicationRow, ApplicationToken), AppError> {
        let token = ApplicationToken::generate();
        let row = self.storage.create_application(name, &token).await?;
        Ok((row, token))
    }

    pub async fn rename_application(
        &self,
        application_id: u64,
        name: &ApplicationName,
    ) -> Result<ApplicationRow, AppError> {
        self.storage
            .rename_application(application_id, name)
            .await?
            .ok_or(AppError::NotFound("application"))
    }

    pub async fn find_application(&self, application_id: u64) -> Result<ApplicationRow, AppError> {
        self.storage
            .find_application(application_id)
            .await?
            .ok_or(AppError::NotFound("application"))
    }

    pub async fn list_applications(
        &self,
        page: PageRequest,
    ) -> Result<Vec<ApplicationRow>, AppError> {
        Ok(self.storage.list_applications(page).await?)
    }

    /// Deletes the application: its tokens end at once (here at once, on the other replicas
    /// within the token cache's TTL) and it leaves every listing; its chats, messages and search
    /// documents are purged in the background, by the consumers of its event (and by counter-sync
    /// once more, for an event lost after the commit or a write that came late).
    pub async fn delete_application(
        &self,
        application_id: u64,
        token: &ApplicationToken,
        trace: &TraceContext,
    ) -> Result<(), AppError> {
        if !self.storage.delete_application(application_id).await? {
            return Err(AppError::NotFound("application"));
        }
        self.token_grants.remove(&token.digest());
        let event = Event::new(EventPayload::ApplicationDeleted {
            application_id,
            deleted_at: chatcore::store::now(),
        });
        self.queue.publish(&event, trace).await?;
        Ok(())
    }
}
