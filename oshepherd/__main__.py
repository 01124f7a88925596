from oshepherd.cli import main

main()
