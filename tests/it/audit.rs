//! The audit log: every privileged operation writes its lines, with the right fields, to a real
//! file; an unwritable sink (`/dev/full`) makes the operations fail and leaves state untouched.

use std::path::Path;

use secrecy::SecretString;
use serde_json::Value;
use tokenbroker::domain::audit::AuditSinkKind;
use tokenbroker_client::{ClientErrorKind, pb};
use tokenbroker_tests::{TestBroker, expose};

use crate::kind_of;

/// The test's HMAC key (at least 32 bytes).
pub(crate) const HMAC_KEY: &str = "audit-test-key-0123456789abcdef0123456789";

/// Returns the hex HMAC-SHA-256 of `email` under [`HMAC_KEY`], computed independently of the
/// broker (aws-lc-rs, not the `hmac` crate).
pub(crate) fn email_hmac(email: &str) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, HMAC_KEY.as_bytes());
    hex(hmac::sign(&key, email.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Spawns a broker auditing to `path`.
pub(crate) async fn audited_broker(
    path: &Path,
    configure: impl FnOnce(&mut tokenbroker::app::settings::Settings),
) -> TestBroker {
    let path = path.to_owned();
    TestBroker::spawn_with(move |s| {
        s.audit.sink = AuditSinkKind::File;
        s.audit.path = Some(path);
        s.audit.email_hmac_key = Some(SecretString::from(HMAC_KEY));
        configure(s);
    })
    .await
}

/// Reads every line of the audit file as JSON.
pub(crate) fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("the audit file exists")
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
        .collect()
}

/// The events of `name` in `phase`.
fn of<'a>(events: &'a [Value], name: &str, phase: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["event"] == name && e["phase"] == phase)
        .collect()
}

/// Checks the fields every line has, and that request and response lines pair up by id.
fn check_common(events: &[Value]) {
    for event in events {
        for field in ["time", "event", "phase", "id", "caller"] {
            assert!(event[field].is_string(), "{field} missing in {event}");
        }
        let time = event["time"].as_str().unwrap();
        assert!(
            time.len() >= 20 && time.contains('T') && time.ends_with('Z'),
            "RFC 3339 time: {time}"
        );
        if event["phase"] == "response" {
            assert!(
                event["outcome"].is_string(),
                "response without outcome: {event}"
            );
        }
        if event["phase"] == "request" {
            let responses = events
                .iter()
                .filter(|e| e["id"] == event["id"] && e["phase"] == "response")
                .count();
            assert!(
                responses >= 1,
                "a request line without its response: {event}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_privileged_operation_is_audited_with_its_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    // Grace 0: presenting a consumed refresh token again is reuse.
    let broker = audited_broker(&path, |s| s.tokens.refresh_grace_seconds = 0).await;
    let email = "Audit.Me@Example.com";
    let normalised = "audit.me@example.com";

    let pair = broker.issue_for_client(email, "web").await;
    let next = broker
        .refresh_as(&pair.refresh.secret, "web")
        .await
        .unwrap();
    assert_eq!(
        kind_of(broker.refresh_as(&pair.refresh.secret, "web").await),
        ClientErrorKind::Unauthenticated,
        "reuse"
    );
    // A secret that names no token of the store concerns no account: it is answered and
    // counted, not audited (so garbage cannot fill the log).
    assert_eq!(
        kind_of(
            broker
                .refresh(&SecretString::from("not-a-broker-secret"))
                .await
        ),
        ClientErrorKind::Unauthenticated
    );
    // Services' introspections are not audited; an admin's are.
    broker
        .service
        .introspect_secret(&next.access.secret)
        .await
        .unwrap();
    broker
        .admin
        .introspect_secret(&pair.access.secret)
        .await
        .unwrap();
    broker
        .admin
        .list_tokens(pb::ListTokensRequest {
            account: Some(pb::list_tokens_request::Account::Email(email.into())),
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Every revocation target; a second pair gives them something to revoke.
    let other = broker.issue(email).await;
    use pb::revoke_request::Target;
    let targets = [
        Target::Token(expose(&other.access.secret)),
        Target::TokenId(other.refresh.token_id.clone()),
        Target::FamilyId(other.family_id.clone()),
        Target::AccountId(other.account_id.clone()),
        Target::Email(email.into()),
    ];
    for target in targets {
        let client = match target {
            Target::Token(_) => &broker.anonymous,
            _ => &broker.admin,
        };
        client
            .revoke(pb::RevokeRequest {
                target: Some(target),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // A denied revocation is audited with its outcome.
    assert_eq!(
        kind_of(
            broker
                .service
                .revoke(pb::RevokeRequest {
                    target: Some(Target::AccountId(other.account_id.clone())),
                    ..Default::default()
                })
                .await
        ),
        ClientErrorKind::PermissionDenied
    );
    broker.stop().await.unwrap();

    let events = read_events(&path);
    check_common(&events);
    let hmac = email_hmac(normalised);

    // Issue: a request line before, a response line with every id after.
    let issue_requests = of(&events, "issue", "request");
    let issue_responses = of(&events, "issue", "response");
    assert_eq!((issue_requests.len(), issue_responses.len()), (2, 2));
    let (request, response) = (issue_requests[0], issue_responses[0]);
    assert_eq!(request["id"], response["id"]);
    assert_eq!(request["caller"], "dev-trigger");
    assert_eq!(request["email_hmac"], hmac.as_str());
    assert_eq!(request["client_id"], "web");
    assert_eq!(response["outcome"], "ok");
    assert_eq!(response["account_id"], pair.account_id.as_str());
    assert_eq!(response["family_id"], pair.family_id.as_str());
    assert_eq!(response["refresh_token_id"], pair.refresh.token_id.as_str());
    assert_eq!(response["access_token_id"], pair.access.token_id.as_str());
    assert_eq!(response["replayed"], false);

    // Refresh: the presented token, then the new pair; the reuse has its own event. The
    // caller is the holder of the refresh secret, named by its token id.
    let holder = format!("token:{}", pair.refresh.token_id);
    let refresh_requests = of(&events, "refresh", "request");
    assert_eq!(
        refresh_requests.len(),
        2,
        "the garbage secret is not audited"
    );
    assert_eq!(refresh_requests[0]["caller"], holder.as_str());
    let refreshes = of(&events, "refresh", "response");
    assert_eq!(refreshes.len(), 2);
    assert_eq!(refreshes[0]["caller"], holder.as_str());
    assert_eq!(refreshes[0]["outcome"], "ok");
    assert_eq!(refreshes[0]["account_id"], pair.account_id.as_str());
    assert_eq!(refreshes[0]["token_id"], pair.refresh.token_id.as_str());
    assert_eq!(
        refreshes[0]["refresh_token_id"],
        next.refresh.token_id.as_str()
    );
    assert_eq!(
        refreshes[0]["access_token_id"],
        next.access.token_id.as_str()
    );
    assert_eq!(refreshes[0]["family_id"], pair.family_id.as_str());
    assert_eq!(refreshes[1]["outcome"], "unauthenticated");
    assert_eq!(
        refreshes[1]["caller"],
        holder.as_str(),
        "the presenter's claim"
    );
    assert!(
        refreshes[1].get("account_id").is_none(),
        "a failed refresh learns no account: {}",
        refreshes[1]
    );
    let reuse = of(&events, "reuse_detected", "response");
    assert_eq!(reuse.len(), 1);
    assert_eq!(reuse[0]["caller"], holder.as_str());
    assert_eq!(reuse[0]["family_id"], pair.family_id.as_str());
    assert_eq!(
        reuse[0]["id"], refreshes[1]["id"],
        "part of the reused refresh"
    );
    assert!(reuse[0]["revoked"].as_u64().unwrap() >= 2, "{}", reuse[0]);

    // Introspect: the admin's only.
    let introspections = of(&events, "introspect", "response");
    assert_eq!(introspections.len(), 1);
    assert_eq!(introspections[0]["caller"], "dev-admin");
    assert_eq!(introspections[0]["token_id"], pair.access.token_id.as_str());
    assert_eq!(introspections[0]["active"], false, "revoked by the reuse");
    assert!(
        of(&events, "introspect", "request").is_empty(),
        "reads log once"
    );

    let lists = of(&events, "list", "response");
    assert_eq!(lists.len(), 1);
    assert_eq!(lists[0]["email_hmac"], hmac.as_str());
    assert_eq!(lists[0]["account_id"], pair.account_id.as_str());
    assert_eq!(lists[0]["listed"], 4);

    // Revoke: every target kind, a request line before each state change.
    let revokes = of(&events, "revoke", "response");
    let targets: Vec<&str> = revokes
        .iter()
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        [
            "secret",
            "token_id",
            "family_id",
            "account_id",
            "email",
            "account_id"
        ]
    );
    assert_eq!(revokes[0]["caller"], "anonymous");
    assert_eq!(revokes[0]["token_id"], other.access.token_id.as_str());
    assert_eq!(revokes[0]["revoked"], 1);
    assert_eq!(revokes[1]["caller"], "dev-admin");
    assert_eq!(revokes[1]["token_id"], other.refresh.token_id.as_str());
    assert_eq!(
        revokes[1]["revoked"], 1,
        "the refresh token; its access was revoked"
    );
    assert_eq!(revokes[2]["family_id"], other.family_id.as_str());
    assert_eq!(revokes[3]["account_id"], other.account_id.as_str());
    assert_eq!(revokes[4]["email_hmac"], hmac.as_str());
    assert_eq!(revokes[4]["account_id"], other.account_id.as_str());
    assert!(revokes[..5].iter().all(|e| e["outcome"] == "ok"));
    assert_eq!(revokes[5]["outcome"], "permission_denied");
    assert_eq!(revokes[5]["caller"], "dev-service");
    let revoke_requests = of(&events, "revoke", "request");
    assert_eq!(
        revoke_requests.len(),
        5,
        "no request line for the denied call"
    );

    // Never a secret or an email.
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in [
        &pair.access.secret,
        &pair.refresh.secret,
        &next.access.secret,
        &next.refresh.secret,
        &other.access.secret,
    ] {
        let secret = expose(secret);
        assert!(
            !text.contains(&secret[secret.len() - 24..]),
            "a secret in the audit log"
        );
    }
    assert!(
        !text.to_lowercase().contains(normalised),
        "an email in the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_sink_makes_privileged_operations_fail_and_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let good = data.path().join("audit.log");
    let email = "full@example.com";

    let first = audited_broker(&good, |s| s.store.embedded.dir = dir.clone()).await;
    let pair = first.issue(email).await;
    first.stop().await.unwrap();

    // The same store, auditing to a device where every write fails (ENOSPC).
    let broker = audited_broker(Path::new("/dev/full"), |s| {
        s.store.embedded.dir = dir.clone();
        s.metrics.listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await;
    use pb::revoke_request::Target;
    for target in [
        Target::TokenId(pair.access.token_id.clone()),
        Target::Email(email.into()),
    ] {
        let err = broker
            .admin
            .revoke(pb::RevokeRequest {
                target: Some(target),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::Unavailable);
        assert!(
            err.message().contains("audit log cannot be written"),
            "{}",
            err.message()
        );
    }
    let by_secret = broker
        .anonymous
        .revoke(pb::RevokeRequest {
            target: Some(Target::Token(expose(&pair.refresh.secret))),
            ..Default::default()
        })
        .await;
    assert_eq!(kind_of(by_secret), ClientErrorKind::Unavailable);
    let refresh = broker.refresh(&pair.refresh.secret).await;
    assert_eq!(kind_of(refresh), ClientErrorKind::Unavailable);
    assert_eq!(
        kind_of(
            broker
                .trigger
                .issue_tokens(tokenbroker_tests::claims_request("new@example.com", ""))
                .await
        ),
        ClientErrorKind::Unavailable
    );

    // Nothing was done: both tokens are still active (a service's introspection is not
    // audited, so it still answers).
    assert!(broker.is_active(&pair.access.secret).await, "not revoked");
    assert!(broker.is_active(&pair.refresh.secret).await, "not rotated");
    let scrape = crate::metrics::Scrape::parse(broker.scrape().await);
    assert_eq!(scrape.value("tokenbroker_audit_write_errors_total"), 5.0);
    assert_eq!(
        scrape.value("tokenbroker_tokens_issued_total{kind=\"access\"}"),
        0.0,
        "nothing minted"
    );
    for operation in ["issue", "refresh", "revoke", "revoke_secret"] {
        assert_eq!(
            scrape.value(&format!(
                "tokenbroker_store_operation_duration_seconds_count{{operation=\"{operation}\"}}"
            )),
            0.0,
            "{operation} never reached the store"
        );
    }
    broker.stop().await.unwrap();
    let events = read_events(&good);
    assert_eq!(events.len(), 2, "only the first broker's issue: {events:?}");
}
