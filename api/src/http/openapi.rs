//! What the handlers' `#[utoipa::path]` annotations leave to the whole document: a description for
//! every response (OpenAPI requires one; a future endpoint cannot forget it), the headers that
//! middleware and the error type send (`Retry-After`, `RateLimit-*`, `WWW-Authenticate`) as
//! reusable components, the `429` every operation may answer, and `additionalProperties: true` on
//! the free-form objects (metadata) that `Object` leaves bare; the legacy forms of the
//! application routes, with the token in the path ([`LegacyTokenPaths`]); and the client token
//! of the chat routes ([`ClientTokenRoutes`]).

use axum::http::StatusCode;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayItems, ObjectBuilder, Schema, SchemaType, Type,
};
use utoipa::openapi::security::SecurityRequirement;
use utoipa::openapi::{
    ContentBuilder, Deprecated, HeaderBuilder, OpenApi, Ref, RefOr, Required, Response,
    ResponseBuilder,
};

use super::tenant;

/// Where the OpenAPI document is served; the docs page at `/docs` reads it.
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Chat platform API",
        description = "Applications, chats and messages with per-parent sequential numbers; writes are accepted (202) and persisted asynchronously; messages are searchable. Every error has the body `{\"error\": {\"code\", \"message\", \"field\"}}`."
    ),
    // Relative: the paths carry `/api/v1`, so the origin that serves this document serves them.
    servers((url = "/", description = "the origin that serves this document")),
    components(schemas(super::live::StreamedMessage)),
    modifiers(&AccessControl),
    tags(
        (name = "applications", description = "created and renamed synchronously; the routes without a token in the path take it in `Authorization: Bearer` (recommended: a URL is recorded by access logs, proxies and browsers); the `/applications/{token}/...` forms are the reference contract's, kept as legacy; listing applications and revoking tokens need the admin token; client tokens, minted by the application for its end users, open chat routes only"),
        (name = "chats", description = "created asynchronously (202)"),
        (name = "messages", description = "created asynchronously (202), updated synchronously, searchable"),
        (name = "webhooks", description = "endpoints that receive every change of the application (Standard Webhooks signatures), at least once, in order per endpoint")
    )
)]
pub(super) struct ApiDoc;

/// The body of a chat's stream: text (`text/event-stream`, what a generated client reads as
/// such), each event's `data:` a `StreamedMessage` (its `contentSchema`).
pub struct EventStreamBody;

impl utoipa::PartialSchema for EventStreamBody {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .content_media_type("text/event-stream")
            .content_schema(Some(Ref::from_schema_name("StreamedMessage")))
            .description(Some(
                "Server-Sent Events; each event's `data:` is a StreamedMessage (JSON).",
            ))
            .into()
    }
}

impl utoipa::ToSchema for EventStreamBody {}

/// The admin token's security scheme.
struct AccessControl;

impl utoipa::Modify for AccessControl {
    fn modify(&self, openapi: &mut OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            ADMIN_SECURITY_SCHEME,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let mut application = Http::new(HttpAuthScheme::Bearer);
        application.description =
            Some("The application's token (`chat_...`), from its creation or rotation.".to_owned());
        components.add_security_scheme(
            APPLICATION_SECURITY_SCHEME,
            SecurityScheme::Http(application),
        );
        let mut client = Http::new(HttpAuthScheme::Bearer);
        client.bearer_format = Some("JWT".to_owned());
        client.description = Some(
            "A client token (a JWT, HS256) the application minted for one end user \
             (`POST /api/v1/application/client-tokens`): the chat routes only, within its chats \
             and scopes, as its sender."
                .to_owned(),
        );
        components.add_security_scheme(CLIENT_SECURITY_SCHEME, SecurityScheme::Http(client));
    }
}

/// The name of the admin token's security scheme in the OpenAPI document (the handlers spell it out: utoipa wants a literal).
pub const ADMIN_SECURITY_SCHEME: &str = "admin_token";
/// The name of the application token's security scheme (spelled out in the handlers too).
pub const APPLICATION_SECURITY_SCHEME: &str = "application_token";
/// The name of the client token's security scheme: added to every chat route by
/// [`ClientTokenRoutes`], by the rule the middleware applies (`crate::http::tenant`).
pub const CLIENT_SECURITY_SCHEME: &str = "client_token";

const RETRY_AFTER: &str = "Retry-After";
const RATE_LIMIT_HEADERS: [&str; 3] = ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"];
const WWW_AUTHENTICATE: &str = "WWW-Authenticate";
const RATE_LIMITED_RESPONSE: &str = "RateLimited";

/// The statuses answered with `Retry-After` (see `ApiError::into_response`).
const RETRY_AFTER_STATUSES: [&str; 3] = ["409", "429", "503"];

/// The reference contract's form of every application route, `/api/v1/applications/{token}/...`,
/// documented from the bearer form it is served as (see `crate::tenant`): the token a path
/// parameter instead of a credential, deprecated, the operation id suffixed `_by_path_token`.
pub struct LegacyTokenPaths;

impl utoipa::Modify for LegacyTokenPaths {
    fn modify(&self, openapi: &mut OpenApi) {
        let legacy: Vec<(String, PathItem)> = openapi
            .paths
            .paths
            .iter()
            .filter_map(|(path, item)| Some((legacy_path(path)?, legacy_item(item.clone()))))
            .collect();
        openapi.paths.paths.extend(legacy);
    }
}

/// The legacy path of a bearer-form path, None for the other routes.
fn legacy_path(path: &str) -> Option<String> {
    if let Some(rest) = path.strip_prefix("/api/v1/application") {
        return (rest.is_empty() || rest.starts_with('/'))
            .then(|| format!("/api/v1/applications/{{token}}{rest}"));
    }
    let rest = path.strip_prefix("/api/v1/chats")?;
    (rest.is_empty() || rest.starts_with('/'))
        .then(|| format!("/api/v1/applications/{{token}}/chats{rest}"))
}

fn legacy_item(mut item: PathItem) -> PathItem {
    for operation in operations_mut(&mut item) {
        operation.operation_id = operation
            .operation_id
            .take()
            .map(|id| format!("{id}_by_path_token"));
        operation.deprecated = Some(Deprecated::True);
        operation.security = None;
        let note = "Legacy form (the reference contract's): the token travels in the URL, which \
                    access logs, proxies and browser history record. Prefer the form with \
                    `Authorization: Bearer`.";
        operation.description = Some(match operation.description.take() {
            Some(description) => format!("{description}\n\n{note}"),
            None => note.to_owned(),
        });
        if let Some(RefOr::T(unauthorized)) = operation.responses.responses.remove("401") {
            drop(unauthorized);
        }
        operation
            .responses
            .responses
            .entry("404".to_owned())
            .or_insert_with(|| RefOr::T(error_response(&default_description("404"))));
        let token = ParameterBuilder::new()
            .name("token")
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .description(Some("application token"))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .build();
        operation
            .parameters
            .get_or_insert_with(Vec::new)
            .insert(0, RefOr::T(token));
    }
    item
}

/// The chat routes of the bearer form take a client token beside the application's (see
/// `crate::http::tenant`, whose rule this applies): each gets the `client_token` requirement and
/// the 403 of a grant that does not cover it; a chat's stream also takes it in `?access_token=`.
pub struct ClientTokenRoutes;

impl utoipa::Modify for ClientTokenRoutes {
    fn modify(&self, openapi: &mut OpenApi) {
        for (path, item) in &mut openapi.paths.paths {
            if !tenant::is_chat_route(path) {
                continue;
            }
            let takes_access_token = tenant::takes_access_token(path);
            for operation in operations_mut(item) {
                operation
                    .security
                    .get_or_insert_with(Vec::new)
                    .push(SecurityRequirement::new(
                        CLIENT_SECURITY_SCHEME,
                        Vec::<String>::new(),
                    ));
                operation
                    .responses
                    .responses
                    .entry("403".to_owned())
                    .or_insert_with(|| RefOr::T(error_response(&default_description("403"))));
                if takes_access_token {
                    let access_token = ParameterBuilder::new()
                        .name("access_token")
                        .parameter_in(ParameterIn::Query)
                        .required(Required::False)
                        .description(Some(
                            "A client token, for a client that cannot send `Authorization` (a \
                             browser's EventSource). Only a client token: an application's \
                             token is refused here (a URL is logged and kept in history).",
                        ))
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                        .build();
                    operation
                        .parameters
                        .get_or_insert_with(Vec::new)
                        .push(RefOr::T(access_token));
                }
            }
        }
    }
}

/// Fills in what the annotations cannot say; see the module doc.
pub struct ResponseConventions;

impl utoipa::Modify for ResponseConventions {
    fn modify(&self, openapi: &mut OpenApi) {
        // Operations without a `security` of their own need no credential (the application token
        // in the path is the capability); an empty requirement says so explicitly.
        openapi.security = Some(vec![SecurityRequirement::default()]);
        let components = openapi.components.get_or_insert_with(Default::default);
        components.headers.extend([
            header(
                RETRY_AFTER,
                0,
                "Seconds to wait before retrying: 1 for a 409 or a 503, the time until the rate \
                 limit admits a request for a 429 (5 for `too_many_streams`).",
            ),
            header(
                "RateLimit-Limit",
                1,
                "The burst of the rate limit (per client address or per application token) with \
                 the fewest requests left. Sent on every answer that passed the rate limiter, \
                 absent when the limits are turned off.",
            ),
            header(
                "RateLimit-Remaining",
                0,
                "Requests left in that limit's bucket now (0 on a 429).",
            ),
            header(
                "RateLimit-Reset",
                0,
                "Seconds until that bucket is full again (on a 429: until it admits a request).",
            ),
            (
                WWW_AUTHENTICATE.to_owned(),
                RefOr::T(
                    HeaderBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .examples(["Bearer realm=\"chat admin\""]),
                        ))
                        .description(Some(
                            "The scheme of the credential wanted: `Bearer` (realm `chat \
                             application` or `chat admin`).",
                        ))
                        .build(),
                ),
            ),
        ]);
        components.responses.insert(
            RATE_LIMITED_RESPONSE.to_owned(),
            RefOr::T(error_response(
                "`rate_limited`: over the rate limit of the client address or of the application \
                 token; or `too_many_streams` (live streams only): as many streams are open as \
                 the replica allows, for the application or in all; or `quota_exceeded` \
                 (creating a message): the application posted its messages of this minute \
                 (`CHAT_MAX_MESSAGES_PER_MINUTE_PER_APPLICATION`). Retry after `Retry-After` \
                 seconds.",
            )),
        );
        for item in openapi.paths.paths.values_mut() {
            operations_mut(item).for_each(describe_operation);
        }
        if let Some(components) = &mut openapi.components {
            for schema in components.schemas.values_mut() {
                if let RefOr::T(schema) = schema {
                    open_free_form_objects(schema);
                }
            }
        }
        if let Some(RefOr::T(rate_limited)) = openapi
            .components
            .as_mut()
            .and_then(|components| components.responses.get_mut(RATE_LIMITED_RESPONSE))
        {
            add_headers(rate_limited, "429");
        }
    }
}

/// An object without properties (`value_type = Object`: the integrator's metadata) says
/// `additionalProperties: true`. JSON Schema allows any key without it, but generators read a bare
/// object as an empty one (openapi-typescript: `Record<string, never>`, to which no metadata could
/// be assigned).
fn open_free_form_objects(schema: &mut Schema) {
    match schema {
        Schema::Object(object) => {
            let is_object = match &object.schema_type {
                SchemaType::Type(kind) => *kind == Type::Object,
                SchemaType::Array(kinds) => kinds.contains(&Type::Object),
                SchemaType::AnyValue => false,
            };
            if is_object && object.properties.is_empty() && object.additional_properties.is_none() {
                object.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(true)));
            }
            for property in object.properties.values_mut() {
                if let RefOr::T(property) = property {
                    open_free_form_objects(property);
                }
            }
        }
        Schema::Array(array) => {
            if let ArrayItems::RefOrSchema(items) = &mut array.items
                && let RefOr::T(items) = items.as_mut()
            {
                open_free_form_objects(items);
            }
        }
        Schema::AllOf(all_of) => all_of.items.iter_mut().for_each(open_in_ref_or),
        Schema::OneOf(one_of) => one_of.items.iter_mut().for_each(open_in_ref_or),
        Schema::AnyOf(any_of) => any_of.items.iter_mut().for_each(open_in_ref_or),
        _ => {}
    }
}

fn open_in_ref_or(schema: &mut RefOr<Schema>) {
    if let RefOr::T(schema) = schema {
        open_free_form_objects(schema);
    }
}

/// Every operation of a path.
fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}

/// An optional request body (`Option<T>` in a handler's annotation) is documented as `T` with
/// `required: false`, not as "`T` or `null`": a generated client then sends no body when none is
/// given, instead of trying to encode a `null` it cannot.
fn without_null_body(operation: &mut Operation) {
    let Some(RefOr::T(body)) = &mut operation.request_body else {
        return;
    };
    if body.required == Some(Required::True) {
        return;
    }
    for content in body.content.values_mut() {
        let RefOr::T(content) = content else {
            continue;
        };
        let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema else {
            continue;
        };
        let not_null: Vec<&RefOr<Schema>> = one_of
            .items
            .iter()
            .filter(|item| {
                !matches!(item, RefOr::T(Schema::Object(object))
                    if object.schema_type == SchemaType::Type(Type::Null))
            })
            .collect();
        if let [only] = not_null.as_slice() {
            content.schema = Some((*only).clone());
        }
    }
}

fn describe_operation(operation: &mut Operation) {
    without_null_body(operation);
    for (status, response) in &mut operation.responses.responses {
        if let RefOr::T(response) = response {
            if response.description.is_empty() {
                response.description = default_description(status);
            }
            add_headers(response, status);
        }
    }
    operation.responses.responses.insert(
        "429".to_owned(),
        RefOr::Ref(Ref::from_response_name(RATE_LIMITED_RESPONSE)),
    );
}

/// The headers an answer of `status` carries, as references to the components.
fn add_headers(response: &mut Response, status: &str) {
    let mut names: Vec<&str> = Vec::new();
    if RETRY_AFTER_STATUSES.contains(&status) {
        names.push(RETRY_AFTER);
    }
    // A 413 is answered while the body is read, before the rate limiter counts the request.
    if status != "413" {
        names.extend(RATE_LIMIT_HEADERS);
    }
    if status == "401" {
        names.push(WWW_AUTHENTICATE);
    }
    for name in names {
        response.headers.insert(
            name.to_owned(),
            RefOr::Ref(Ref::new(format!("#/components/headers/{name}"))),
        );
    }
}

/// An integer header component with a lower bound.
fn header(name: &str, minimum: u32, description: &str) -> (String, RefOr<utoipa::openapi::Header>) {
    let schema = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(minimum));
    (
        name.to_owned(),
        RefOr::T(
            HeaderBuilder::new()
                .schema(Some(schema))
                .description(Some(description))
                .build(),
        ),
    )
}

fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// What an answer of `status` means, with the error codes it carries (`ApiError::code`), for a
/// response whose annotation says nothing more specific.
fn default_description(status: &str) -> String {
    let described = match status {
        "400" => {
            "`bad_request`: malformed JSON, a wrong JSON type, or a bad path, query or header \
             parameter (`field` names it)"
        }
        "401" => {
            "`application_key_required`: no valid application token in `Authorization: Bearer` \
             (missing, unknown, expired or revoked); `invalid_token`: a client token that is \
             malformed, altered, expired or revoked; on the admin routes `unauthorized`: no \
             `Authorization: Bearer <admin token>`"
        }
        "403" => {
            "`insufficient_scope`: the client token does not open this chat, the chat list, or \
             this scope (or the body names another sender than the token's); `forbidden`: the \
             bearer token is not the admin token; `quota_exceeded` (creating a chat): the \
             application has as many chats as `CHAT_MAX_CHATS_PER_APPLICATION` allows"
        }
        "404" => "`not_found`: unknown application (also a malformed token), chat or message",
        "409" => {
            "`idempotency_key_in_use` or `not_persisted_yet`; retry after `Retry-After` seconds"
        }
        "413" => "`payload_too_large`: the request body is over the size limit",
        "415" => "`unsupported_media_type`: a JSON body without `Content-Type: application/json`",
        "422" => "`validation_failed`: a field breaks a rule (`field` names it)",
        "503" => {
            "`service_unavailable` or `timed_out`: a dependency did not answer in time; retry \
             after `Retry-After` seconds (a POST with the same `Idempotency-Key` keeps its number)"
        }
        _ => {
            return status
                .parse::<u16>()
                .ok()
                .and_then(|code| StatusCode::from_u16(code).ok())
                .and_then(|code| code.canonical_reason())
                .unwrap_or("the answer")
                .to_owned();
        }
    };
    described.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_response_of_every_operation_is_described() {
        let document = super::super::openapi();
        for (path, item) in &document.paths.paths {
            for operation in [&item.get, &item.put, &item.post].into_iter().flatten() {
                for (status, response) in &operation.responses.responses {
                    if let RefOr::T(response) = response {
                        assert!(!response.description.is_empty(), "{path} {status}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_free_form_object_allows_additional_properties() {
        let document = serde_json::to_value(super::super::openapi()).unwrap();
        let schemas = &document["components"]["schemas"];
        for (schema, field) in [
            ("ChatInput", "metadata"),
            ("ChatDetails", "metadata"),
            ("MessageInput", "metadata"),
            ("MessageEditInput", "metadata"),
            ("MessageDetails", "metadata"),
        ] {
            let property = &schemas[schema]["properties"][field];
            assert_eq!(
                property["additionalProperties"], true,
                "{schema}.{field}: {property}"
            );
        }
        // Objects with properties of their own are left as they are.
        assert!(schemas["ChatInput"].get("additionalProperties").is_none());
    }

    #[test]
    fn a_status_without_a_text_of_its_own_gets_its_reason_phrase() {
        assert_eq!(default_description("200"), "OK");
        assert_eq!(default_description("418"), "I'm a teapot");
        assert_eq!(default_description("weird"), "the answer");
        assert!(default_description("404").starts_with("`not_found`"));
    }
}
