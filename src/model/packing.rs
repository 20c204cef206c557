//! Sequences packed along one row that share their first positions: a pair's chosen and rejected
//! sequences begin with the same prompt, so the second one's shared positions are not computed
//! again. Its own rows follow, at positions after the shared ones, and attend to the first
//! sequence's rows for the shared keys and values (the same values, computed once: every layer
//! before attention works row by row).
//!
//! Two layouts: the packed row (each row computed once, what embeddings, projections, norms and
//! MLPs see) and the whole layout (every sequence end to end with all its positions, what the
//! attention's keys and values take, gathered from the packed row at each layer).

use super::gather_rows::RowMap;
use crate::error::{Error, Result};
use candle_core::Device;
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
    /// Packed row → whole layout: the packed row behind each position of the whole layout.
    pub to_whole: RowMap,
    /// Whole layout → packed row: each packed row's own position in the whole layout.
    pub to_own: RowMap,
    /// Each packed row's position within its sequence.
    pub positions: Vec<u32>,
    /// Each sequence's own rows (its queries: its last positions), where they follow one
    /// another in the packed row in the pieces' order, as the tiled attention's query offsets
    /// take them (how batches lay them out); `None` for another order.
    pub queries: Option<Arc<[usize]>>,
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
        let in_order = pieces
            .iter()
            .scan(0, |at, p| {
                let ok = p.start == *at;
                *at += p.len;
                Some(ok)
            })
            .all(|ok| ok);
        Ok(Self {
            queries: in_order.then(|| pieces.iter().map(|p| p.len).collect()),
            pieces: pieces.into(),
            to_whole: RowMap::new(&whole_rows, rows, device)?,
            to_own: RowMap::new(&place, n, device)?,
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

    /// The row spans that can be computed apart, in order: (first piece, pieces, rows), each a
    /// run of pieces on consecutive rows that no piece outside it shares from (a pair, as
    /// stage one's and training's batches lay it out). Errors when a piece shares rows outside
    /// its run.
    pub fn units(&self) -> Result<Vec<(usize, usize, usize)>> {
        let mut units: Vec<(usize, usize, usize)> = Vec::new();
        let mut row = 0;
        for (i, p) in self.pieces.iter().enumerate() {
            if p.start != row {
                return Err(Error::Model(format!(
                    "packed sequences: {p:?} is not on the rows after the one before"
                )));
            }
            match units.last_mut() {
                // a piece sharing rows joins the unit that holds them
                Some((_, n, rows)) if p.shared > 0 => {
                    if p.from < row - *rows {
                        return Err(Error::Model(format!(
                            "packed sequences: {p:?} shares rows before its own unit"
                        )));
                    }
                    (*n, *rows) = (*n + 1, *rows + p.len);
                }
                _ => units.push((i, 1, p.len)),
            }
            row += p.len;
        }
        Ok(units)
    }

    /// The pieces `first..first + n` (a run of [`Self::units`]) as a packed row of their own,
    /// their rows counted from their first.
    pub fn part(&self, first: usize, n: usize, device: &Device) -> Result<Self> {
        let base = self.pieces[first].start;
        let pieces = self.pieces[first..first + n]
            .iter()
            .map(|p| Piece {
                start: p.start - base,
                from: p.from.saturating_sub(base),
                ..*p
            })
            .collect();
        Self::new(pieces, device)
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
        let v = |t: &candle_core::Tensor| t.to_vec1::<u32>().unwrap();
        assert_eq!(v(&s.to_whole.rows), [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7]);
        assert_eq!(v(&s.to_own.rows), [0, 1, 2, 3, 4, 8, 9, 10]);
        // the transposes: rows 0-2 read twice, the whole layout's repeated ones by none
        assert_eq!(s.to_whole.back.len(), 2);
        let none = crate::model::gather_rows::NO_ROW;
        assert_eq!(
            v(&s.to_whole.back[1]),
            [5, 6, 7, none, none, none, none, none]
        );
        assert_eq!(
            v(&s.to_own.back[0]),
            [0, 1, 2, 3, 4, none, none, none, 5, 6, 7]
        );
        assert_eq!(s.positions, [0, 1, 2, 3, 4, 3, 4, 0]);
        assert_eq!(s.lens(), [5, 5, 1]);
        assert_eq!(s.rows(), 8);
        // two units: the pair, then the one alone; each a packed row of its own
        assert_eq!(s.units().unwrap(), [(0, 2, 7), (2, 1, 1)]);
        let pair = s.part(0, 2, &Device::Cpu).unwrap();
        assert_eq!(v(&pair.to_whole.rows), [0, 1, 2, 3, 4, 0, 1, 2, 5, 6]);
        let alone = s.part(2, 1, &Device::Cpu).unwrap();
        assert_eq!((alone.pieces[0], alone.rows()), (Piece::own(0, 1), 1));
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
