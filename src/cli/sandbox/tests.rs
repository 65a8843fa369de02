//! Unit tests of `sandbox`.

use super::*;
use crate::cli::{Cli, Command};
use clap::Parser;

fn parse(args: &[&str]) -> Result<SandboxArgs, clap::Error> {
    let cli = Cli::try_parse_from(args)?;
    match cli.command {
        Command::Sandbox(args) => Ok(args),
        other => panic!("parsed as {other:?}, not sandbox"),
    }
}

#[test]
fn serve_options_have_defaults() {
    let args = parse(&["paywatch", "sandbox"]).expect("parses");
    assert!(args.action.is_none());
    assert_eq!(args.serve.api_listen.to_string(), DEFAULT_API_LISTEN);
    assert_eq!(
        args.serve.firestore_listen.to_string(),
        DEFAULT_FIRESTORE_LISTEN
    );
    assert_eq!(args.serve.status_spelling, SpellingArg::Upper);
    let args = parse(&[
        "paywatch",
        "sandbox",
        "--api-listen",
        "127.0.0.1:9000",
        "--status-spelling",
        "spec",
        "--heartbeat",
        "500ms",
    ])
    .expect("parses");
    assert_eq!(args.serve.api_listen.port(), 9000);
    assert_eq!(args.serve.heartbeat, Duration::from_millis(500));
    assert_eq!(args.serve.firestore_auth, FirestoreAuthArg::Open);
    let args = parse(&[
        "paywatch",
        "sandbox",
        "--firestore-auth",
        "rules",
        "--require-sign-in",
        "--token-lifetime",
        "5s",
    ])
    .expect("parses");
    assert_eq!(args.serve.firestore_auth, FirestoreAuthArg::Rules);
    assert!(args.serve.require_sign_in);
    assert_eq!(args.serve.token_lifetime, Duration::from_secs(5));
    assert!(parse(&["paywatch", "sandbox", "--firestore-auth", "oauth"]).is_err());
}

#[test]
fn subcommands_parse_and_reject_serve_options() {
    let args =
        parse(&["paywatch", "sandbox", "refund", "123", "--amount", "1.50"]).expect("parses");
    match args.action {
        Some(SandboxCommand::Refund(refund)) => {
            assert_eq!(refund.target.id, "123");
            assert_eq!(refund.amount.as_deref(), Some("1.50"));
            assert_eq!(refund.target.sandbox, DEFAULT_SANDBOX_URL);
        }
        other => panic!("expected refund, got {other:?}"),
    }
    assert!(
        parse(&[
            "paywatch",
            "sandbox",
            "--api-listen",
            "127.0.0.1:1",
            "pay",
            "1"
        ])
        .is_err()
    );
    assert!(
        parse(&["paywatch", "sandbox", "pay"]).is_err(),
        "the id is required"
    );
}

#[tokio::test]
async fn actions_drive_a_running_sandbox() {
    let sandbox = Sandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox starts");
    let checkout = sandbox
        .state()
        .create_link(&crate::paymennt::wire::LinkRequest {
            request_id: "R".into(),
            order_id: "O".into(),
            description: "D".into(),
            currency: "AED".into(),
            amount: crate::paymennt::wire::JsonDecimal("20.00".parse().expect("decimal")),
            ..Default::default()
        })
        .await
        .expect("created");
    let id = checkout.id.expect("id").0;
    let url = format!("http://{}", sandbox.api_addr());
    let target = |id: &str| ActionArgs {
        id: id.to_owned(),
        sandbox: url.clone(),
    };
    let line = drive(&SandboxCommand::Pay(target(&id)))
        .await
        .expect("paid");
    assert_eq!(line, format!("checkout {id}: PAID (20.00 AED)"));
    let line = drive(&SandboxCommand::Refund(RefundArgs {
        target: target(&id),
        amount: Some("5".into()),
    }))
    .await
    .expect("refunded");
    assert_eq!(
        line,
        format!("checkout {id}: PARTIALLY_REFUNDED (20.00 AED, 5.00 refunded)")
    );

    let unknown = drive(&SandboxCommand::Pay(target("1653241101733169556")))
        .await
        .expect_err("unknown id");
    assert!(unknown.is::<UsageError>(), "{unknown:#}");
    assert!(
        unknown
            .to_string()
            .starts_with("no checkout '1653241101733169556'"),
        "{unknown:#}"
    );
    let twice = drive(&SandboxCommand::Cancel(target(&id)))
        .await
        .expect_err("cannot cancel a refunded checkout");
    assert!(twice.is::<UsageError>(), "{twice:#}");
    let bad_id = drive(&SandboxCommand::Pay(target("../x")))
        .await
        .expect_err("bad id");
    assert!(bad_id.is::<UsageError>());
    let bad_amount = drive(&SandboxCommand::Refund(RefundArgs {
        target: target(&id),
        amount: Some("-1".into()),
    }))
    .await
    .expect_err("bad amount");
    assert!(bad_amount.is::<UsageError>());
    sandbox.shutdown().await;

    let gone = drive(&SandboxCommand::Pay(target(&id)))
        .await
        .expect_err("the sandbox is gone");
    assert!(!gone.is::<UsageError>(), "unreachable is a runtime error");
    assert!(
        format!("{gone:#}").contains("cannot reach the sandbox"),
        "{gone:#}"
    );
}
