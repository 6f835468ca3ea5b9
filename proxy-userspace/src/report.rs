//! Errors on one line, causes included: log lines and health bodies are
//! read by people grepping, not by debuggers.

use std::error::Error;

/// `error: cause: cause`, down the whole `source()` chain (the errno of a
/// failed system call is usually at the end).
#[must_use]
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
