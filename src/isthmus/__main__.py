from isthmus.cli.main import main

main()
