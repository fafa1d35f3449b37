from pdserve.server.router.servicer import main

main()
