//! Stop sequences over a stream of text pieces, including ones split across tokens.

/// Holds back text that could be the start of a stop sequence until it knows.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct Matched {
    /// Text that is safe to send.
    pub text: String,
    /// The stop sequence found, if one was; `text` ends right before it.
    pub stop: Option<String>,
}

impl StopMatcher {
    /// Matches `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds a piece of generated text.
    pub fn push(&mut self, piece: &str) -> Matched {
        if self.stops.is_empty() {
            return Matched {
                text: piece.to_owned(),
                stop: None,
            };
        }
        self.pending.push_str(piece);
        // The earliest complete match wins.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = found {
            let stop = stop.clone();
            let text = self.pending[..at].to_owned();
            self.pending.clear();
            return Matched { text, stop: Some(stop) };
        }
        // Keep the longest tail that is a proper prefix of some stop sequence.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        Matched { text, stop: None }
    }

    /// The held-back text, at the end of the generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stop.is_some() {
                return (out, r.stop);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn no_stops_passes_text_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
    }

    #[test]
    fn a_stop_inside_one_piece_cuts_before_it() {
        assert_eq!(run(&["END"], &["abcENDxyz"]), ("abc".into(), Some("END".into())));
    }

    #[test]
    fn a_stop_spanning_pieces_is_found_and_never_sent() {
        assert_eq!(
            run(&["</answer>"], &["42</", "ans", "wer>tail"]),
            ("42".into(), Some("</answer>".into()))
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(run(&["STOP"], &["ST", "OP!"]).1, Some("STOP".into()));
        assert_eq!(run(&["STOP"], &["ST", "AR"]), ("STAR".into(), None));
    }

    #[test]
    fn the_earliest_of_several_wins() {
        assert_eq!(run(&["zz", "b"], &["abzz"]), ("a".into(), Some("b".into())));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), None));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), Some("é!".into())));
    }
}
