//! Prints the fault matrix (`ferry_tests::matrix::MATRIX`) as the README's Markdown table.

fn main() {
    print!("{}", ferry_tests::matrix::markdown());
}
