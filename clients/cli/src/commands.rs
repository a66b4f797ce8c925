//! The commands: each turns its arguments into one broker call (or, for `list --all-pages`, a
//! bounded series of them) and hands the answer to `render`.

use std::{io::Write as _, time::Duration};

use secrecy::{ExposeSecret as _, SecretString};
use tokenbroker_client::{Client, ClientErrorKind, Code, ServingStatus, pb};

use crate::{
    Exit, Failure,
    args::{Hint, IntrospectArgs, IssueArgs, ListArgs, RevokeArgs},
    render::{self, Printer},
};

/// Longest `list --all-pages` follows `next_page_token`: a bound, not an expected size.
const MAX_PAGES: usize = 1000;

fn hint(hint: Option<Hint>) -> i32 {
    match hint {
        None => pb::TokenTypeHint::Unspecified,
        Some(Hint::Access) => pb::TokenTypeHint::AccessToken,
        Some(Hint::Refresh) => pb::TokenTypeHint::RefreshToken,
    }
    .into()
}

pub(crate) async fn issue(client: &Client, args: IssueArgs, out: Printer) -> Result<(), Failure> {
    let request = pb::IssueTokensRequest {
        subject: Some(pb::issue_tokens_request::Subject::Claims(
            pb::AssertedClaims {
                email: args.email,
                cognito_sub: args.cognito_sub.unwrap_or_default(),
                user_pool_id: args.user_pool_id.unwrap_or_default(),
                client_id: args.client_id.unwrap_or_default(),
                groups: args.groups,
            },
        )),
        idempotency_key: args.idempotency_key.unwrap_or_default(),
        access_ttl_seconds: args.access_ttl.unwrap_or(0),
        refresh_ttl_seconds: args.refresh_ttl.unwrap_or(0),
        metadata: args.metadata.into_iter().collect(),
    };
    let pair = client.issue_tokens(request).await?;
    let show = if args.print_secrets {
        render::Secrets::Show
    } else {
        render::Secrets::Hide
    };
    out.emit(
        || render::issue_table(&pair, show),
        || render::issue_json(&pair, show),
    );
    if show == render::Secrets::Hide && !out.json {
        let _ = writeln!(
            std::io::stderr(),
            "secrets not shown: pass --print-secrets to print them (they cannot be shown again)"
        );
    }
    Ok(())
}

pub(crate) async fn introspect(
    client: &Client,
    args: &IntrospectArgs,
    secret: &SecretString,
    out: Printer,
) -> Result<(), Failure> {
    let response = client
        .introspect(pb::IntrospectRequest {
            token: secret.expose_secret().to_owned(),
            token_type_hint: hint(args.hint),
            client_id: args.client_id.clone().unwrap_or_default(),
            access_only: args.access_only,
        })
        .await?;
    out.emit(
        || render::introspect_table(&response),
        || render::introspect_json(&response),
    );
    Ok(())
}

pub(crate) async fn revoke(
    client: &Client,
    args: RevokeArgs,
    secret: Option<SecretString>,
    out: Printer,
) -> Result<(), Failure> {
    use pb::revoke_request::Target;
    let (target, what) = if let Some(secret) = &secret {
        (
            Target::Token(secret.expose_secret().to_owned()),
            "the token".to_owned(),
        )
    } else if let Some(id) = args.token_id {
        (Target::TokenId(id.clone()), format!("token {id}"))
    } else if let Some(id) = args.family {
        (Target::FamilyId(id.clone()), format!("family {id}"))
    } else if let Some(id) = args.account {
        (Target::AccountId(id.clone()), format!("account {id}"))
    } else if let Some(email) = args.email {
        (Target::Email(email.clone()), format!("account {email}"))
    } else {
        unreachable!("clap requires one target");
    };
    let by_secret = secret.is_some();
    let response = client
        .revoke(pb::RevokeRequest {
            target: Some(target),
            token_type_hint: hint(args.hint),
            client_id: args.client_id.unwrap_or_default(),
        })
        .await?;
    out.emit(
        || render::revoke_table(&what, by_secret, response.revoked_count),
        || render::revoke_json(response.revoked_count),
    );
    Ok(())
}

pub(crate) async fn list(client: &Client, args: ListArgs, out: Printer) -> Result<(), Failure> {
    use pb::list_tokens_request::Account;
    let account = match (args.email, args.account) {
        (Some(email), _) => Account::Email(email),
        (None, Some(id)) => Account::AccountId(id),
        (None, None) => unreachable!("clap requires --email or --account"),
    };
    let mut page_token = args.page_token.unwrap_or_default();
    let mut listing = pb::ListTokensResponse::default();
    for _ in 0..MAX_PAGES {
        let page = client
            .list_tokens(pb::ListTokensRequest {
                account: Some(account.clone()),
                page_size: args.page_size,
                page_token,
                include_inactive: args.include_inactive,
            })
            .await?;
        listing.account_id = page.account_id;
        listing.tokens.extend(page.tokens);
        listing.next_page_token = page.next_page_token;
        if !args.all_pages || listing.next_page_token.is_empty() {
            break;
        }
        page_token = listing.next_page_token.clone();
    }
    out.emit(
        || render::list_table(&listing),
        || render::list_json(&listing),
    );
    Ok(())
}

/// `health`: grpc.health.v1 `Check`, through tokenbroker-client (whose deadline is `timeout`).
/// Exit 0 only when serving.
pub(crate) async fn health(
    client: &Client,
    service: &str,
    timeout: Duration,
    out: Printer,
) -> Result<(), Failure> {
    let status = match client.check_health(service).await {
        Ok(status) => status,
        Err(err) if err.code() == Code::NotFound => {
            return Err(Failure::new(
                Exit::InvalidArgument,
                "NOT_FOUND",
                format!("the broker has no health service named {service:?}"),
            ));
        }
        Err(err) if err.kind() == ClientErrorKind::DeadlineExceeded => {
            return Err(Failure::new(
                Exit::Unavailable,
                "DEADLINE_EXCEEDED",
                format!("no health answer within {}s", timeout.as_secs()),
            ));
        }
        Err(err) => return Err(err.into()),
    };
    let name = status.as_str_name();
    out.emit(|| name.to_owned(), || render::health_json(service, name));
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(Failure::new(
            Exit::Unavailable,
            "NOT_SERVING",
            format!("health service {service:?} reports {name}"),
        ))
    }
}
