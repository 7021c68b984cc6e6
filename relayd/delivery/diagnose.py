"""Plain-language diagnosis of smarthost failures: what an error means and how to fix it.

Pure data and one lookup function, shared by ``relayd send-test`` and the troubleshooting
docs. Each rule matches the server's reply (code, enhanced status, text) and/or the
forwarder's error sentence; the first rule that matches wins, so specific rules come first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayd.model import Reply


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """What went wrong (``meaning``) and what to do about it (``fix``)."""

    key: str
    meaning: str
    fix: str


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches when every given condition holds (None = don't care)."""

    diagnosis: Diagnosis
    codes: tuple[int, ...] | None = None
    dsn: str | None = None
    text: str | None = None      # regex searched in the reply text (case-insensitive)
    error: str | None = None     # regex searched in the forwarder's error sentence

    def matches(self, reply: Reply | None, error: str) -> bool:
        if self.codes is not None and (reply is None or reply.code not in self.codes):
            return False
        if self.dsn is not None and (reply is None or reply.dsn != self.dsn):
            return False
        if self.text is not None and (reply is None or not re.search(self.text, reply.text, re.I)):
            return False
        return self.error is None or bool(re.search(self.error, error, re.I))


def _d(key: str, meaning: str, fix: str) -> Diagnosis:
    return Diagnosis(key, meaning, fix)


RULES: tuple[Rule, ...] = (
    Rule(_d("o365-smtp-auth-disabled",
            "Office 365 refused the login because SMTP AUTH is disabled for this mailbox or "
            "tenant (535 5.7.139).",
            "In the Microsoft 365 admin center enable 'Authenticated SMTP' for the mailbox "
            "(Set-CASMailbox -SmtpClientAuthenticationDisabled $false) and check that "
            "Security Defaults do not block it, or switch this smarthost to method: xoauth2."),
         codes=(535,), dsn="5.7.139"),
    Rule(_d("oauth-token-rejected",
            "The server rejected the OAuth2 access token even after one refresh.",
            "Check the token's scope (Google: https://mail.google.com/, Microsoft: "
            "https://outlook.office365.com/.default), that auth.username is the mailbox the "
            "token is for, and that the app has SMTP.Send / domain-wide delegation; "
            "run 'relayd oauth token' to test."),
         error=r"AUTH XOAUTH2 failed"),
    Rule(_d("oauth-unavailable",
            "No OAuth2 access token could be obtained for XOAUTH2.",
            "Run 'relayd oauth token --smarthost NAME' to see why; if the refresh token was "
            "revoked, run 'relayd oauth authorize'."),
         error=r"no OAuth access token"),
    Rule(_d("bad-credentials",
            "The server rejected the username or password (535).",
            "Check auth.username and the password. Gmail and Google Workspace need an App "
            "Password (2-Step Verification on), not the account password; SES needs SMTP "
            "credentials, not IAM access keys; SendGrid uses the username 'apikey'."),
         codes=(535,)),
    Rule(_d("mechanism-refused",
            "The server does not accept this authentication mechanism (504 5.7.4); Office 365 "
            "answers PLAIN like this.",
            "Use auth.method: auto (relayd then falls back to the next mechanism, e.g. LOGIN), "
            "or set the method to one the server lists after AUTH in its EHLO reply."),
         codes=(504,)),
    Rule(_d("send-as-denied",
            "The server refused the sender: the authenticated mailbox may not send as this "
            "From address (554 5.2.252 SendAsDenied).",
            "Send with the authenticated mailbox as From (use --from, or sender.from with "
            "mode: always and sender.envelope_from), or grant Send As permission for that "
            "address in Exchange."),
         text=r"SendAsDenied|5\.2\.252|not allowed to send as|5\.7\.60"),
    Rule(_d("auth-not-offered",
            "Authentication is configured but the server did not offer AUTH.",
            "Most providers offer AUTH only after TLS: use tls: starttls (587) or tls: implicit "
            "(465). If this server relays by IP address instead, set auth.method: none."),
         error=r"does not offer AUTH"),
    Rule(_d("starttls-required",
            "The server requires TLS before this command (530 must issue STARTTLS).",
            "Set tls: starttls for this smarthost (port 587), or tls: implicit on port 465."),
         codes=(530,), text=r"STARTTLS"),
    Rule(_d("auth-required",
            "The server requires authentication before accepting mail (530).",
            "Configure auth (method, username, password) for this smarthost."),
         codes=(530,)),
    Rule(_d("starttls-not-offered",
            "tls: starttls is configured but the server did not offer STARTTLS, so nothing was "
            "sent (relayd never falls back to clear text).",
            "Check host and port: port 465 needs tls: implicit; some networks strip STARTTLS "
            "(a firewall or antivirus doing SMTP inspection). Use tls: none only for a "
            "trusted local server."),
         error=r"does not offer STARTTLS"),
    Rule(_d("certificate",
            "The server's TLS certificate could not be verified.",
            "Check that host is the name on the certificate (not an IP or alias), that the "
            "system CA bundle is current, or point ca_file at the CA that signed it. Use "
            "verify_certificate: false only for a test server."),
         error=r"certificate verify failed|CERTIFICATE_VERIFY_FAILED"),
    Rule(_d("tls-handshake",
            "The TLS handshake failed.",
            "Check the port and TLS mode pairing (587: starttls, 465: implicit) and that the "
            "server supports TLS 1.2 or newer."),
         error=r"TLS handshake"),
    Rule(_d("domain-not-verified",
            "The provider has not verified the sending domain or address (SES 554 "
            "'Email address is not verified', Mailgun 'Domain not found / not verified').",
            "Verify the From domain or address in the provider's console (SES: verified "
            "identities, and leave the sandbox to send to any recipient; Mailgun: add and "
            "verify the domain's DNS records)."),
         codes=(450, 451, 550, 554), text=r"not verified|domain (?:is )?not found|unverified|"
                                          r"identity|sandbox"),
    Rule(_d("no-8bitmime",
            "The smarthost does not offer 8BITMIME and the message has 8-bit data relayd cannot "
            "convert to 7 bit without changing it (5.6.3, RFC 6152): 8-bit header fields, a "
            "binary part, or signed content. Nothing was sent.",
            "Send through a smarthost that offers 8BITMIME (listed in its EHLO reply above), or "
            "make the application encode non-ASCII header fields (RFC 2047) and attachments "
            "(base64); then 'relayd queue retry ID'."),
         dsn="5.6.3"),
    Rule(_d("quota",
            "The provider's sending quota or rate limit is reached; the mail waits.",
            "Wait for the quota window to reset, or lower limits.rate / limits.daily_cap to "
            "match the provider's quota."),
         text=r"quota|rate exceeded|throttl|relay limit|sending limit"),
    Rule(_d("service-unavailable",
            "The server is closing the connection or is temporarily unavailable (421).",
            "Usually temporary: relayd retries with backoff. If it persists, check the "
            "provider's status page, your connection limits (max_connections) and whether "
            "your IP is blocked."),
         codes=(421,)),
    Rule(_d("connection-refused",
            "Nothing accepted the connection at that host and port (connection refused).",
            "Check host and port. Providers take submission on 587 (starttls) or 465 "
            "(implicit); many networks and cloud hosts block outgoing port 25."),
         error=r"refused|Connect call failed|Errno 111"),
    Rule(_d("timeout",
            "The server did not answer in time (connection or reply timeout).",
            "A firewall probably drops the traffic: try port 587 or 465 (port 25 is often "
            "blocked), check outbound firewall rules, or raise the smarthost timeout."),
         error=r"timed out|timeout"),
    Rule(_d("unreachable",
            "The host name could not be resolved or the network is unreachable.",
            "Check the host spelling and DNS resolution on this machine."),
         error=r"cannot resolve the host name|Name or service not known|nodename nor servname|"
               r"unreachable|getaddrinfo"),
    Rule(_d("recipient-rejected",
            "The server refused the recipient address.",
            "Check the address; a 5.1.1 reply means the mailbox does not exist."),
         codes=(550, 551, 553), dsn=None, text=r"recipient|user|mailbox|5\.1\.\d"),
)


def diagnose(reply: Reply | None, error: str = "") -> Diagnosis | None:
    """The first matching diagnosis for a failed attempt, or None when nothing fits."""
    for rule in RULES:
        if rule.matches(reply, error):
            return rule.diagnosis
    return None


def as_markdown() -> str:
    """The table as Markdown for docs/troubleshooting: one row per diagnosis."""
    parts = ["| problem | what it means | how to fix it |", "|---|---|---|"]
    for rule in RULES:
        d = rule.diagnosis
        parts.append(f"| `{d.key}` | {d.meaning} | {d.fix} |".replace("\n", " "))
    return "\n".join(parts) + "\n"
