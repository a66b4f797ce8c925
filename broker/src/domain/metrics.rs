//! The domain's metrics: tokens issued and revoked, and audit lines that could not be written.

use crate::{
    model::TokenKind,
    obs::metrics::{Counter, Family, Label, MetricSet, Zeros},
};

impl Label for TokenKind {
    const NAME: &'static str = "kind";
    const VALUES: &'static [&'static str] = &["access", "refresh"];
    fn index(self) -> usize {
        match self {
            Self::Access => 0,
            Self::Refresh => 1,
        }
    }
}

crate::label! {
    /// Why tokens were revoked, as the `cause` label.
    pub enum RevokeCause: "cause" {
        /// A Revoke call.
        Request = "request",
        /// Reuse detection on a refresh.
        Reuse = "reuse",
    }
}

/// Every metric of the domain layer.
#[derive(Debug)]
pub struct DomainMetrics {
    /// `tokenbroker_tokens_issued_total{kind}`.
    pub tokens_issued: Family<Counter, TokenKind>,
    /// `tokenbroker_tokens_revoked_total{cause}`.
    pub tokens_revoked: Family<Counter, RevokeCause>,
    /// `tokenbroker_audit_write_errors_total`.
    pub audit_write_errors: Family<Counter, ()>,
    /// `tokenbroker_unknown_secrets_total`.
    pub unknown_secrets: Family<Counter, ()>,
}

impl Default for DomainMetrics {
    fn default() -> Self {
        Self {
            tokens_issued: Family::new(
                "tokenbroker_tokens_issued_total",
                "Tokens minted (by IssueTokens and by rotation), by kind.",
                Zeros::Show,
            ),
            tokens_revoked: Family::new(
                "tokenbroker_tokens_revoked_total",
                "Tokens made inactive by a revocation, by cause (a Revoke call or reuse detection).",
                Zeros::Show,
            ),
            audit_write_errors: Family::new(
                "tokenbroker_audit_write_errors_total",
                "Audit events that could not be written (their operations failed).",
                Zeros::Show,
            ),
            unknown_secrets: Family::new(
                "tokenbroker_unknown_secrets_total",
                "Refresh and revoke-by-secret calls whose secret names no token of the store (malformed or forged); answered as inactive and not audited.",
                Zeros::Show,
            ),
        }
    }
}

impl MetricSet for DomainMetrics {
    fn render(&self, out: &mut String) {
        self.tokens_issued.render(out);
        self.tokens_revoked.render(out);
        self.audit_write_errors.render(out);
        self.unknown_secrets.render(out);
    }
}
