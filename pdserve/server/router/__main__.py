from pdserve.server.router.main import main

main()
