from leanauth.cli import main

main()
