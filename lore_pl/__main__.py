from lore_pl.cli import main

main()
