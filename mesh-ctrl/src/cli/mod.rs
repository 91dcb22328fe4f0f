//! Subcommands other than `serve`: each returns what it prints, so tests call them directly.
pub mod check;
pub mod remote;

/// How a subcommand prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Human,
    Json,
}
