//! `deb-assets DIR`: writes the man pages and shell completions the .deb
//! ships (`scripts/build-deb` runs it before `cargo deb`), generated from
//! the daemon's own clap definition ([`recording_relay::cli::Cli`]), so
//! they cannot drift from `--help`.
//!
//! A tool of its own rather than a `build.rs` or a hidden subcommand: the
//! daemon's binary carries no man page generator, and its build script
//! would have to compile the CLI (and every type it names) twice.
//!
//! Writes `DIR/man/recording-relay.1` and one page per subcommand
//! (`recording-relay-jobs-requeue.1`, ...), and
//! `DIR/completions/{recording-relay.bash,_recording-relay,recording-relay.fish}`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use recording_relay::cli::Cli;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: deb-assets DIR (writes DIR/man and DIR/completions)");
        return ExitCode::from(2);
    };
    match write_all(PathBuf::from(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deb-assets: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(dir: PathBuf) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        // Stale pages of a removed subcommand must not be packaged.
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
        std::fs::create_dir_all(d)?;
    }
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "recording-relay", &completions)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_gets_a_man_page_and_completions_know_it() {
        let dir = tempfile::tempdir().unwrap();
        write_all(dir.path().to_owned()).unwrap();
        let man = dir.path().join("man");
        let main = std::fs::read_to_string(man.join("recording-relay.1")).unwrap();
        assert!(main.contains("recording\\-relay\\-jobs(1)"), "{main}");
        let requeue = std::fs::read_to_string(man.join("recording-relay-jobs-requeue.1")).unwrap();
        assert!(requeue.contains("all\\-failed"), "{requeue}");
        for file in [
            "recording-relay.bash",
            "_recording-relay",
            "recording-relay.fish",
        ] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(file)).unwrap();
            assert!(
                text.contains("requeue") && text.contains("setup-bucket"),
                "{file}"
            );
        }
    }
}
