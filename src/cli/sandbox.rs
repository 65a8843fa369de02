//! `paywatch sandbox`: run the sandbox in the foreground, or drive a running one.

/// Arguments of `paywatch sandbox`.
#[derive(Debug, clap::Args)]
pub struct SandboxArgs {}

/// Runs `paywatch sandbox`.
pub async fn run(_args: SandboxArgs) -> anyhow::Result<()> {
    anyhow::bail!("the sandbox is not built yet")
}
