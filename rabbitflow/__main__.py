from rabbitflow.cli import main

main()
