//! Sequences packed along one row that share their first positions: a pair's chosen and rejected
//! sequences begin with the same prompt, so the second one's shared positions are not computed
//! again. Its own rows follow, at positions after the shared ones, and attend to the first
//! sequence's rows for the shared keys and values (the same values, computed once: every layer
//! before attention works row by row).
//!
//! Two layouts: the packed row (each row computed once, what embeddings, projections, norms and
//! MLPs see) and the whole layout (every sequence end to end with all its positions, what the
//! attention's keys and values take, gathered from the packed row at each layer).

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// One sequence of a packed row: its own rows, after `shared` positions it takes from the rows
/// `from..from + shared` (another sequence's first positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Its first own row in the packed row.
    pub start: usize,
    /// Its own rows (positions `shared..shared + len`).
    pub len: usize,
    /// The packed row of its first shared position.
    pub from: usize,
    /// Its positions whose rows another sequence computes (0: none, and `from` is unused).
    pub shared: usize,
}

impl Piece {
    /// A sequence with no shared positions.
    pub fn own(start: usize, len: usize) -> Self {
        Self {
            start,
            len,
            from: start,
            shared: 0,
        }
    }

    /// Its positions, shared and own.
    pub fn whole(&self) -> usize {
        self.shared + self.len
    }
}

/// A packed row's sequences, some of them sharing first positions, with the row maps between its
/// two layouts on the device.
#[derive(Debug, Clone)]
pub struct Sharing {
    pub pieces: Arc<[Piece]>,
    /// [Σ whole] u32: the packed row behind each position of the whole layout.
    pub whole_rows: Tensor,
    /// [Σ own] u32: each packed row's place in the whole layout (its own position there).
    pub own_rows: Tensor,
    /// Each packed row's position within its sequence.
    pub positions: Vec<u32>,
}

impl Sharing {
    /// `pieces` in whole-layout order. Their own rows must cover the packed row once each, and
    /// each shared range must be the first positions of a sequence without shared positions of
    /// its own (so that row i of the range is position i there).
    pub fn new(pieces: Vec<Piece>, device: &Device) -> Result<Self> {
        let rows: usize = pieces.iter().map(|p| p.len).sum();
        let mut place = vec![u32::MAX; rows];
        let mut positions = vec![0u32; rows];
        let mut whole_rows = Vec::with_capacity(pieces.iter().map(Piece::whole).sum());
        let bad = |what: String| Err(Error::Model(format!("packed sequences: {what}")));
        for p in &pieces {
            if p.len == 0 || p.start + p.len > rows {
                return bad(format!("{p:?} is empty or outside {rows} rows"));
            }
            if p.shared > 0 {
                let source = pieces
                    .iter()
                    .find(|s| s.shared == 0 && s.start == p.from && s.len >= p.shared && s != &p);
                if source.is_none() {
                    return bad(format!(
                        "{p:?} shares rows that are no sequence's first positions"
                    ));
                }
            }
            whole_rows.extend((p.from..p.from + p.shared).map(|r| r as u32));
            for (k, r) in (p.start..p.start + p.len).enumerate() {
                if place[r] != u32::MAX {
                    return bad(format!("row {r} belongs to two sequences"));
                }
                place[r] = whole_rows.len() as u32;
                positions[r] = (p.shared + k) as u32;
                whole_rows.push(r as u32);
            }
        }
        let n = whole_rows.len();
        Ok(Self {
            pieces: pieces.into(),
            whole_rows: Tensor::from_vec(whole_rows, n, device)?,
            own_rows: Tensor::from_vec(place, rows, device)?,
            positions,
        })
    }

    /// The packed row's length.
    pub fn rows(&self) -> usize {
        self.positions.len()
    }

    /// Each sequence's positions, in whole-layout order.
    pub fn lens(&self) -> Vec<usize> {
        self.pieces.iter().map(Piece::whole).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_map_between_the_two_layouts() {
        // [S C] whole, then R after S's 3 positions; a third sequence alone
        let pieces = vec![
            Piece::own(0, 5),
            Piece {
                start: 5,
                len: 2,
                from: 0,
                shared: 3,
            },
            Piece::own(7, 1),
        ];
        let s = Sharing::new(pieces, &Device::Cpu).unwrap();
        let v = |t: &Tensor| t.to_vec1::<u32>().unwrap();
        assert_eq!(v(&s.whole_rows), [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7]);
        assert_eq!(v(&s.own_rows), [0, 1, 2, 3, 4, 8, 9, 10]);
        assert_eq!(s.positions, [0, 1, 2, 3, 4, 3, 4, 0]);
        assert_eq!(s.lens(), [5, 5, 1]);
        assert_eq!(s.rows(), 8);
    }

    #[test]
    fn overlapping_or_unrooted_pieces_are_refused() {
        let shares = |from, shared| Piece {
            start: 2,
            len: 1,
            from,
            shared,
        };
        for pieces in [
            vec![Piece::own(0, 2), Piece::own(1, 2)],
            vec![Piece::own(0, 2), shares(1, 1)],
            vec![Piece::own(0, 2), shares(0, 3)],
            vec![Piece::own(0, 2), Piece::own(2, 0)],
        ] {
            assert!(Sharing::new(pieces, &Device::Cpu).is_err());
        }
    }
}
