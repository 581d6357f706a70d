//! A column-aligned table for people: a header row, two spaces between
//! columns, no trailing padding on the last column.

#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(headers: I) -> Table {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are kept.
    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) -> &mut Table {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(display_width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < columns {
                    line.extend(std::iter::repeat_n(' ', width - display_width(cell)));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Width in terminal columns, close enough for ids, names and arrows
/// (one column per char; tabs and newlines in cells are the caller's
/// business).
fn display_width(s: &str) -> usize {
    s.chars().count()
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_to_the_widest_cell() {
        let mut table = Table::new(["ID", "STATE", "REASON"]);
        table.row(["a", "RUNNING", ""]);
        table.row(["longer-id", "QUEUED", "waiting for an agent"]);
        assert_eq!(
            table.render(),
            "ID         STATE    REASON\n\
             a          RUNNING\n\
             longer-id  QUEUED   waiting for an agent\n"
        );
    }

    #[test]
    fn non_ascii_cells_align_by_characters() {
        let mut table = Table::new(["A", "B"]);
        table.row(["→x", "1"]);
        table.row(["abc", "2"]);
        assert_eq!(table.render(), "A    B\n→x   1\nabc  2\n");
    }

    #[test]
    fn short_rows_are_padded_and_an_empty_table_prints_its_header() {
        let mut table = Table::new(["A", "B", "C"]);
        assert!(table.is_empty());
        assert_eq!(table.render(), "A  B  C\n");
        table.row(["x"]);
        assert_eq!(table.render(), "A  B  C\nx\n");
    }
}
