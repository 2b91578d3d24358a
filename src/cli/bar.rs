//! `pensieve serve` in a terminal: a one-line progress bar for each model being loaded (bytes
//! of weights read of the total, from the bridge's reports), drawn on stderr by indicatif, with
//! the log lines written above it. Not on a terminal, or with JSON logs, there is no bar and
//! the log says a load's progress every few seconds instead.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing_subscriber::fmt::MakeWriter;

use crate::backend::LoadProgress;

struct Bars {
    all: MultiProgress,
    loads: BTreeMap<String, ProgressBar>,
}

static BARS: Mutex<Option<Bars>> = Mutex::new(None);

/// Draws loads' progress on stderr from now on; log lines go through [`LogWriter`].
pub fn install() {
    *BARS.lock().unwrap_or_else(|e| e.into_inner()) = Some(Bars {
        all: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
        loads: BTreeMap::new(),
    });
    crate::backend::observe_loads(on_progress);
}

fn on_progress(model: &str, progress: Option<LoadProgress>) {
    let mut guard = BARS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bars) = guard.as_mut() else { return };
    let Some(p) = progress else {
        if let Some(bar) = bars.loads.remove(model) {
            bar.finish_and_clear();
            bars.all.remove(&bar);
        }
        return;
    };
    let bar = bars.loads.entry(model.to_owned()).or_insert_with(|| {
        let bar = bars.all.add(ProgressBar::new(p.total_bytes));
        bar.set_style(
            ProgressStyle::with_template("loading {prefix} [{bar:30}] {bytes}/{total_bytes} ({percent}%), {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(model.to_owned());
        bar
    });
    bar.set_length(p.total_bytes);
    bar.set_position(p.done_bytes);
}

/// The log's writer while bars may be drawn: each line is written with the bars hidden, then
/// the bars are drawn again below it.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

/// One log line, written out whole when dropped.
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let all = BARS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|b| !b.loads.is_empty())
            .map(|b| b.all.clone());
        let write = || {
            let _ = std::io::stderr().lock().write_all(&self.0);
        };
        match all {
            Some(all) => all.suspend(write),
            None => write(),
        }
    }
}
